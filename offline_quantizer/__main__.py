"""``python -m offline_quantizer`` is ``rosaq-quantize``."""

from offline_quantizer.cli import quantize_main

quantize_main()
