import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch (OpenMP) thread in the test process and in every process it launches (CLI runs, bench and memory
# children; accelerate launches already get 1 each): the suite's models are tiny, and on a shared 2-core machine a
# second thread makes every op wait for a descheduled one (measured: a 6-step toy2d run 7 s with 2 threads, 0.95 s
# with 1; test_compile.py + test_estimate.py 251 s -> 124 s). Set before anything imports torch; tests that need
# another count set it themselves (trainer.torch_threads, torch.set_num_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
