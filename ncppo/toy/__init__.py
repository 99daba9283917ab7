"""The toy world: a small, fully offline world that plays the paper's whole story on CPU.

The procedural captioned-image world (:mod:`ncppo.toy.world`), its programmatic judge (:mod:`ncppo.toy.oracle`,
registered here as the evaluation reward ``oracle``), the tiny base model (:mod:`ncppo.toy.pretrain`), the
simulated annotators (:mod:`ncppo.toy.annotators`), and the stages that play it end to end
(:mod:`ncppo.toy.stages`, paths in :mod:`ncppo.toy.layout`, config in :mod:`ncppo.toy.config`).
"""

from ncppo.evaluation.rewards import register_reward

register_reward("oracle", "ncppo.toy.oracle:oracle_reward")
