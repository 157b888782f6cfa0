"""PyTorch bridge: export trained models to PyTorch state dicts and evaluate them with AutoAttack.

PyTorch and pyautoattack are optional: this package imports them only when one of its functions
is first used (`from score_jax.torch_bridge import build_torch_model`), and raises
`MissingTorchError` (a ScoreError and an ImportError) with the install command if absent.

Public API:
  build_torch_model(model_name, num_classes, **kw) -> torch.nn.Module
  export_state_dict(model_name, variables) -> dict[str, torch.Tensor]
  import_state_dict(model_name, state_dict, template) -> Flax variables
  export_workdir(config, workdir, params="auto") -> metadata   (--mode export)
  load_exported(export_dir) -> torch.nn.Module (eval mode)
  run_autoattack(config, workdir, params="auto") -> results    (--mode autoattack)
"""

import importlib
from typing import Any

from score_jax.errors import ScoreError

INSTALL_HINT = "pip install torch==2.13.0 pyautoattack"

_EXPORTS = {
    "build_torch_model": "models",
    "DMWideResNet": "models",
    "PreActResNet": "models",
    "ResNet": "models",
    "SmallCNN": "models",
    "export_state_dict": "export",
    "import_state_dict": "export",
    "export_workdir": "export",
    "load_exported": "export",
    "run_autoattack": "autoattack_eval",
}


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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_torch(autoattack=_EXPORTS[name] == "autoattack_eval")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)


__all__ = ["INSTALL_HINT", "MissingTorchError", "require_torch", *_EXPORTS]
