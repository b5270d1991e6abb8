"""nerco-dist: NerCo two-stage Chinese NER (FLAT + CRF), Triton kernels, DeepSpeed training."""

__version__ = "0.1.0"
