"""Every name gin configs may use, registered once (module ``keras_etsdm``).

Import this module (bin/train does) before parsing gin files. Names, usable with or without
the ``keras_etsdm.`` prefix:

* ``train``                 the run driver (``training.train``): steps, batch, checkpoints, logs
* ``build_model``           ``DiffusionModel`` from network / schedule / sharing
                            (``build_model.use_etsdm = False`` is the DDPM baseline,
                            ``build_model.prediction_type = 'v'`` / ``'x0'`` the target;
                            ``DiscreteVPSchedule.zero_terminal_snr = True`` needs one of them)
* ``build_network``         the U-Net (``folding.build_network``: ``build_unet`` arguments + fold)
* ``make_dataset``          the input pipeline (embedded / folder / tfrecord / lmdb / tfds)
* ``make_optimizer``        Adam + warm-up + gradient clipping
* ``grid_sampler``          the sampler of the training sample grids (DDIM)
* ``DiscreteVPSchedule``, ``ContinuousVPSchedule`` (continuous-time training), ``TimestepSharing``
* the samplers: ``DDIMSampler``, ``DDPMSampler``, ``DPMSolverSampler``,
  ``ProbabilityFlowSampler``, ``ReverseSDESampler``, ``EulerMaruyamaSampler``,
  ``PredictorCorrectorSampler``, ``get_sampler``

``@gin.configurable`` on a Keras Layer subclass breaks (IndexError), so classes and functions are
registered from outside with ``gin.external_configurable``; the functions above are plain
Python, testable without gin.
"""

import logging

import gin

from keras_etsdm import data, folding, optimizers, samplers, training
from keras_etsdm.schedules import ContinuousVPSchedule, DiscreteVPSchedule
from keras_etsdm.time_sharing import TimestepSharing

MODULE = "keras_etsdm"

train = gin.external_configurable(training.train, "train", module=MODULE)
build_model = gin.external_configurable(training.build_model, "build_model", module=MODULE)
build_network = gin.external_configurable(folding.build_network, "build_network", module=MODULE)
make_dataset = gin.external_configurable(data.make_dataset, "make_dataset", module=MODULE)
make_optimizer = gin.external_configurable(optimizers.make_optimizer, "make_optimizer",
                                           module=MODULE)
grid_sampler = gin.external_configurable(training.default_grid_sampler, "grid_sampler",
                                         module=MODULE)
gin.external_configurable(DiscreteVPSchedule, "DiscreteVPSchedule", module=MODULE)
gin.external_configurable(ContinuousVPSchedule, "ContinuousVPSchedule", module=MODULE)
gin.external_configurable(TimestepSharing, "TimestepSharing", module=MODULE)
for _sampler_class in (samplers.DDPMSampler, samplers.DDIMSampler, samplers.DPMSolverSampler,
                       samplers.ProbabilityFlowSampler, samplers.ReverseSDESampler,
                       samplers.EulerMaruyamaSampler, samplers.PredictorCorrectorSampler):
    gin.register(_sampler_class, module=MODULE)
gin.register(samplers.get_sampler, module=MODULE)

DEFAULT_CONFIG = "default.gin"


def parse(gin_files=(), bindings=(), search_paths=(), skip_unknown=False):
    """Parse gin files (default: ``default.gin``) and bindings, after adding search paths.

    Returns the list of files parsed.
    """
    for path in search_paths:
        gin.add_config_file_search_path(path)
    gin_files = list(gin_files) or [DEFAULT_CONFIG]
    # gin first probes each name as a Python-package resource and logs a (harmless, misleading)
    # "Path not found" ERROR before finding the file on the search path; hide that message.
    gin_logger = logging.getLogger("root")
    probe_filter = _DropMessages("Path not found")
    gin_logger.addFilter(probe_filter)
    try:
        gin.parse_config_files_and_bindings(gin_files, list(bindings),
                                            skip_unknown=skip_unknown)
    except ValueError as error:
        if "gin.REQUIRED" in str(error):
            name = str(error).split("/")[0]
            raise ValueError(f"{error} Set it, e.g. --gin.{name}=\"'/path/to/data'\" (gin files: "
                             f"{gin_files}).") from error
        raise
    finally:
        gin_logger.removeFilter(probe_filter)
    return gin_files


class _DropMessages(logging.Filter):
    def __init__(self, prefix):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        return not str(record.msg).startswith(self.prefix)


def run(workdir, **overrides):
    """Call the gin-configured ``train`` (bindings already parsed) with the operative config."""
    return train(workdir=workdir, operative_config_fn=gin.operative_config_str, **overrides)
