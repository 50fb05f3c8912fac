"""Emulators over gridded fields ``(time, channel, lat, lon)``; EOF is the baseline reducer.

They work on tensors only; :mod:`geonn.fields` converts labelled data to and from them.
"""

from .eof import EOFReducer

__all__ = ["EOFReducer"]
