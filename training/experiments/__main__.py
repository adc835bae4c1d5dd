import os
import sys

from models.hardware import choose_openmp_wait

# Before torch loads its OpenMP runtime: passive waits on a busy machine, no spinning against other jobs.
os.environ["MMF_OPENMP_WAIT"] = choose_openmp_wait()

from training.experiments.cli import main

sys.exit(main())
