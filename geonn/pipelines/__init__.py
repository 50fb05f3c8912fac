"""netCDF pipelines: ``geonn fields reduce|emulate|generate IN.nc --var V --out DIR``.

Each verb reads one variable of a netCDF file through :mod:`geonn.fields` (:func:`open_field`),
trains its model on the first part of the time axis, scores it (and its classical baseline)
on the held-out last part, and writes its outputs into a staged folder that becomes ``DIR``
only when everything is written (:func:`run_verb`). Verb modules define an options dataclass
``Options`` and ``run(data, options, folder, *, seed, progress) -> metrics``.
"""

from .source import FieldData, open_field
from .verbs import VERBS, run_verb

__all__ = ["VERBS", "FieldData", "open_field", "run_verb"]
