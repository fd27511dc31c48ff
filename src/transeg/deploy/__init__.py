"""Deploying an exported model on a CPU: int8 quantisation and the ONNX Runtime back-end.

- `transeg.deploy.quantize`: `quantize_int8(onnx_in, onnx_out, calibration=images | None, count=N)`: static
  int8 (QDQ, per-channel weights, calibrated on the user's images through the model's test protocol), or
  dynamic int8 with no images; the operators that lose accuracy in int8 stay fp32 (see the module).
- `transeg.deploy.backend`: `OnnxModel`, an `.onnx` file in the model contract transeg's inference, evaluation
  and service drive (`transeg predict / eval / serve model.onnx`), and `load_model(source, backend)`.
- `transeg.deploy.runtime`: `OnnxSegmenter`, numpy + Pillow + onnxruntime only, for a deployment without torch.

This file imports nothing, so importing one of them costs only what that one needs.
"""
