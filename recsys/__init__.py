"""recsys: multimodal news recommendation."""
