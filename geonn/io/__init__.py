"""Files: atomic writers for netCDF, JSON and figures, and safe checkpoints."""

from .atomic import atomic_path, write_text
from .files import load_checkpoint, save_checkpoint, write_figure, write_json, write_netcdf

__all__ = ["atomic_path", "load_checkpoint", "save_checkpoint", "write_figure", "write_json", "write_netcdf", "write_text"]
