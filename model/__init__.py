"""Networks, model packages (card + safetensors + ONNX) and the runtimes that run them."""
