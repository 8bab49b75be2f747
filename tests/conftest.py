import os
import tempfile

# Many tests build the same small networks; a persistent compilation cache shared by
# the run lets later tests reuse earlier compiles instead of recompiling.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxquant-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
