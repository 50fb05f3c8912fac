"""Files: atomic writers for netCDF, JSON and figures, and safe checkpoints."""

from .atomic import atomic_path, remove_temporaries, write_text
from .files import load_checkpoint, save_checkpoint, write_figure, write_json, write_netcdf
from .folders import check_output_folder, staged_folder

__all__ = [
    "atomic_path", "check_output_folder", "load_checkpoint", "remove_temporaries", "save_checkpoint", "staged_folder",
    "write_figure", "write_json", "write_netcdf", "write_text",
]
