"""ROSAQ for vLLM. ``register()`` is the ``vllm.general_plugins`` entry point.

``import rosaq_vllm`` does not import vLLM: the checkpoint module is usable without it.
"""

_REGISTERED = False


def register() -> None:
    """Register the ``rosaq`` quantization method with vLLM (idempotent: runs in every vLLM process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import rosaq_vllm.config  # noqa: F401  (the decorator registers RosaqConfig)

    _REGISTERED = True
