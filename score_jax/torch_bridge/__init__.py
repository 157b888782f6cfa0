"""PyTorch bridge: export trained models to PyTorch state dicts and evaluate them with AutoAttack.

PyTorch and pyautoattack are optional: importing this package does not import them; its
submodules do. Call `require_torch()` before importing one: it raises `MissingTorchError` (a
ScoreError and an ImportError) with the install command if they are absent.

Submodules:
  models           PyTorch twins; build_torch_model(model_name, num_classes, **kw)
  convert          export_state_dict(model_name, variables), import_state_dict(name, sd, template)
  export           export_workdir(config, workdir, params)  (--mode export), load_exported(dir)
  released         load_variables(path, model_name, template, mean, std)  (config.init_from)
  autoattack_eval  run_autoattack(config, workdir, params)  (--mode autoattack)
"""

import importlib

from score_jax.errors import ScoreError

INSTALL_HINT = "pip install torch==2.13.0 pyautoattack"


class MissingTorchError(ImportError, ScoreError):
    """PyTorch or pyautoattack is not installed."""


def require_torch(autoattack: bool = False) -> None:
    """Raises MissingTorchError (one line, with the install command) if torch (and, if
    `autoattack`, pyautoattack) cannot be imported."""
    missing = []
    for module in ("torch", "pyautoattack")[: 2 if autoattack else 1]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingTorchError(
            f"the PyTorch bridge needs {' and '.join(missing)}, not installed: {INSTALL_HINT}"
        )


__all__ = ["INSTALL_HINT", "MissingTorchError", "require_torch"]
