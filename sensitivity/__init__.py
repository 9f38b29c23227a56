"""Sensitivity estimators: ``score(model, data, method) -> Sensitivity`` (L x B loss table).

Estimators (one per file, registered by name): hessian (HAWQ-V3), fisher (ModelOpt auto_quantize),
decoupled (MixDQ), lim / zd (Layer-wise Quantization), measured (CalibTIP / ExLlamaV2), block (a
Hugging Face causal-LM folder streamed one decoder block at a time; HIGGS-style block-local errors).
Called on every rank of an initialised ``torch.distributed`` process group, ``score`` spreads the work
over the ranks (``distributed``); ``checkpoint=`` keeps a partial table so a rerun resumes (``checkpoint``).

Example:
    >>> from bitplan.sensitivity import score, load
    >>> t = score(model, batches, method="hessian", bits=(2, 3, 4, 8)); t.save("sens.json")
"""
if __name__ == "bitplan.sensitivity":
    from .registry import ESTIMATORS, ScoreContext, register, score
    from .table import Sensitivity, load
    from . import decoupled, fisher, hessian, lim, measured, streaming, zd  # noqa: F401  (fill the registry)

    __all__ = ["score", "load", "Sensitivity", "register", "ESTIMATORS", "ScoreContext"]
else:   # this source folder imported as a top-level 'sensitivity' (the repository root is on sys.path): stay
    __all__ = []   # empty, so it never shadows another distribution of that name (e.g. HF's 'kernels')
