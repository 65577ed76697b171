"""Evaluation under a ZeRO-3 DeepSpeed engine: `deepspeed --num_gpus 2 tests/evaluate_zero3_probe.py OUT_DIR`.

Each rank writes OUT_DIR/rank<R>.json with the accuracy and loss it got (through the engine and through
engine.module) and how many forward passes it ran; tests/evaluation/test_evaluate.py compares them with one process.
(Files, not stdout: the launcher interleaves the ranks' output.)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moelora_ds.data.tokenization import tokenize_records  # noqa: E402
from moelora_ds.distributed.process_group import end_rank_process  # noqa: E402
from moelora_ds.evaluation.evaluate import eval_batches, evaluate_loss, multiple_choice_accuracy  # noqa: E402

from conftest import build_tiny_model, build_tokenizer, multiple_choice_records  # noqa: E402

RECORDS, SEED, MICRO_BATCH = 11, 4, 2
DS_CONFIG = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "zero_allow_untested_optimizer": True,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}

if __name__ == "__main__":
    deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tokenizer, model = build_tokenizer(), build_tiny_model("llama", seed=3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=None, config=DS_CONFIG)
    calls = []
    engine.module.register_forward_pre_hook(lambda *_: calls.append(1))
    records = multiple_choice_records(RECORDS, seed=SEED)
    examples, _ = tokenize_records(records, "chat", tokenizer, 96)
    report = {"rank": rank, "partitioned": next(engine.module.parameters()).numel() == 0}
    for name, target in (("engine", engine), ("module", engine.module)):
        report[name] = {
            "accuracy": multiple_choice_accuracy(target, tokenizer, records, micro_batch_size=MICRO_BATCH, rank=rank,
                                                 world_size=world_size),
            "loss": evaluate_loss(target, eval_batches(examples, micro_batch_size=MICRO_BATCH, rank=rank,
                                                       world_size=world_size, pad_token_id=tokenizer.pad_token_id),
                                  world_size=world_size)}
    report["forward_calls"] = len(calls)
    (Path(sys.argv[-1]) / f"rank{rank}.json").write_text(json.dumps(report))
    end_rank_process(0)
