"""SFTKey on top of Hugging Face TRL: two-stage chain-of-thought SFT (whole response, then key answer tokens)."""

__version__ = "0.1.0"
