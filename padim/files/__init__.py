"""Files and formats: decoding pictures and masks, model files (safetensors + JSON), atomic writes."""
