"""Stages a run is made of; ``method.stages`` names them in order."""

from dpgen.stages.evaluate import evaluate
from dpgen.stages.sample import sample
from dpgen.stages.training import dp_train, pretrain_public, train

STAGES = {
    "pretrain_public": pretrain_public,
    "train": train,
    "dp_train": dp_train,
    "sample": sample,
    "evaluate": evaluate,
}
