# docs/twinflow.md "Image-free training on digits": a flow-matching teacher, then TwinFlow from it with and without
# images (each 240 s, one thread; 2-core machine shared with other work, 1-minute load 1.5-2.4)
set -x
P=python
$P -m fewstep objective=flow_matching objective.cond_dropout=0.1 trainer.time_limit_s=240 trainer.torch_threads=1 hydra.run.dir=/tmp/if/fm
$P -m fewstep objective=twinflow trainer.init_from=/tmp/if/fm objective.image_free=true teacher=frozen objective.enhanced_ratio=1.0 trainer.time_limit_s=240 trainer.torch_threads=1 hydra.run.dir=/tmp/if/imgfree
$P -m fewstep objective=twinflow trainer.init_from=/tmp/if/fm trainer.time_limit_s=240 trainer.torch_threads=1 hydra.run.dir=/tmp/if/data
