"""Every pytest session (tests and benchmarks) compiles into a private Inductor cache: the shared on-disk cache
does not notice a changed fake kernel and would replay a stale graph."""
import os
import tempfile

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastkd-inductor-"))
