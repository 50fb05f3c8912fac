"""Emulators over gridded fields ``(time, channel, lat, lon)``; EOF is the baseline reducer.

They work on tensors only; :mod:`geonn.fields` converts labelled data to and from them.
"""

from .autoencoder import AutoencoderReducer, AutoencoderTraining
from .cnn import CNNEmulator, EmulatorTraining, fit_emulator, is_periodic_longitude
from .eof import EOFReducer
from .gan import FieldGAN, GANConfig
from .linear import LinearInverseModel, Persistence, RidgeEmulator
from .sampler import EOFGaussianSampler

__all__ = ["EOFReducer"]
__all__ += ["EOFGaussianSampler", "FieldGAN", "GANConfig"]
__all__ += ["AutoencoderReducer", "AutoencoderTraining"]
__all__ += ["CNNEmulator", "EmulatorTraining", "LinearInverseModel", "Persistence", "RidgeEmulator", "fit_emulator", "is_periodic_longitude"]
