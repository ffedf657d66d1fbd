"""``from sparseml.pytorch.sparsification.quantization import QuantizationModifier``."""

from sparseml.modifiers.quantization import QuantizationModifier, quant_bits_by_layer

__all__ = ["QuantizationModifier", "quant_bits_by_layer"]
