"""keras_etsdm: E-TSDM (Early Timestep-shared Diffusion Model) for Keras 3."""

__version__ = "0.1.0"

from keras_etsdm.schedules import (ContinuousVPSchedule, DiscreteVPSchedule, LinearVPSDE,
                                   make_betas)
from keras_etsdm.time_sharing import TimestepSharing
from keras_etsdm.unet import build_unet, DDPM_CIFAR10, DDPM_256, ADM_IMAGENET64
from keras_etsdm.model import DiffusionModel
from keras_etsdm.guidance import ClassifierFreeGuidance
from keras_etsdm.callbacks import StopOnNonFiniteLoss, NonFiniteLossError
from keras_etsdm.samplers import (DDIMSampler, DDPMSampler, DPMSolverSampler,
                                  ProbabilityFlowSampler, Sampler, get_sampler)

__all__ = [
    "DiscreteVPSchedule", "ContinuousVPSchedule", "LinearVPSDE", "make_betas", "TimestepSharing",
    "build_unet", "DDPM_CIFAR10", "DDPM_256", "ADM_IMAGENET64", "DiffusionModel",
    "ClassifierFreeGuidance",
    "StopOnNonFiniteLoss", "NonFiniteLossError", "DDIMSampler", "DDPMSampler",
    "DPMSolverSampler", "ProbabilityFlowSampler", "Sampler", "get_sampler",
]
