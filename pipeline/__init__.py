"""caption: caption large folders of images with a vision-language model behind an OpenAI-compatible API."""

__version__ = "0.1.0"
