"""One worker of the MultiWorkerMirroredStrategy test (TF_CONFIG in the environment): 3 SCL steps, then
writes what it holds (queue, weights hash, the chief's Acc@1) to `<work_dir>/worker<index>.json`."""

import json
import os
import sys


def main(work_dir, data_dir):
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    from mm_ads.config import DataConfig, ExperimentConfig, SCLConfig, TrainConfig
    from mm_ads.scl.encode import encoder_version
    from mm_ads.scl.task import SCLTask
    from mm_ads.training import distribute
    from mm_ads.training.trainer import Trainer

    strategy = distribute.make_strategy("multi_worker")
    config = ExperimentConfig(
        task="scl", model_dir=f"{work_dir}/model",
        data=DataConfig(data_dir=data_dir, batch_size=8, eval_batch_size=16, shuffle_buffer=0),
        train=TrainConfig(dense_optimizer="sgd", dense_learning_rate=0.5, seed=0, max_steps=3, log_every=1,
                          export=False, strategy="multi_worker"),
        scl=SCLConfig(output_dim=8, projection_hidden=16, text_width=8, text_layers=1, text_heads=2, max_tokens=8,
                      num_oov_buckets=4, queue_size=13, momentum=0.9, temperature_init=0.2)).validate()
    task = SCLTask(config)
    trainer = Trainer(task, config.train, 8, config.model_dir, strategy)
    metrics = trainer.train()
    model = trainer.model
    out = {"replicas": strategy.num_replicas_in_sync, "queue_ids": model.queue.ids.numpy().tolist(),
           "pointer": int(model.queue.pointer.numpy()), "encoder": encoder_version(model.encoder),
           "key_encoder": encoder_version(model.key_encoder), "acc@1": metrics.get("acc@1"),
           "chief": trainer.chief}
    with open(f"{work_dir}/worker{index}.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
