"""ROSAQ for vLLM. ``register()`` is the ``vllm.general_plugins`` entry point.

``import rosaq_vllm`` does not import vLLM: the checkpoint module is usable without it.
"""

_REGISTERED = False


def register() -> None:
    """Register the ``rosaq`` quantization method with vLLM (idempotent: runs in every vLLM process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from rosaq_kernels.machete import MACHETE_ENV

    import rosaq_vllm.config  # noqa: F401  (the decorator registers RosaqConfig)

    _declare_compile_env(MACHETE_ENV)
    _REGISTERED = True


def _declare_compile_env(name: str) -> None:
    """Make the environment variable ``name`` part of vLLM's torch.compile cache key.

    vLLM keys its compile cache on its own environment variables (``vllm.envs.environment_variables``, read by
    ``compile_factors()`` in 0.26 through 0.33). ``ROSAQ_MACHETE`` decides which tensors the compiled graph
    takes (Machete's weight copy or ``None``), so a graph cached under the other setting would fail at load
    (``KeyError: 'machete_qweight'``, seen on vLLM 0.26). Registered here, toggling it compiles anew.
    """
    import os

    import vllm.envs as envs

    table = getattr(envs, "environment_variables", None)
    if isinstance(table, dict):
        table.setdefault(name, lambda: os.environ.get(name))
