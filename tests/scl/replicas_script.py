"""Run as a subprocess by test_distributed.py: 2 replicas (MirroredStrategy over 2 logical CPUs) vs 1.

Prints one JSON line with the comparisons. The CPU must be split before TensorFlow initialises, hence a
separate process.
"""

import json
import sys


def main(work_dir, full=False):
    from mm_ads.training import distribute

    distribute.split_cpu(2)
    import keras
    import numpy as np
    import tensorflow as tf

    from mm_ads.config import DataConfig, ExperimentConfig, SCLConfig, TrainConfig
    from mm_ads.scl.task import SCLTask
    from mm_ads.training.trainer import Trainer
    from tests.scl.tiny_data import write_tiny_text_pairs

    rng = np.random.default_rng(1)
    data_dir = f"{work_dir}/data"
    ids = write_tiny_text_pairs(data_dir)

    out = {}
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def variant(use_queue):
        config = ExperimentConfig(
            task="scl", model_dir=f"{work_dir}/m{int(use_queue)}",
            data=DataConfig(data_dir=data_dir, batch_size=8, eval_batch_size=16, shuffle_buffer=0),
            train=TrainConfig(dense_optimizer="sgd", dense_learning_rate=0.5, seed=0, max_steps=3, log_every=1,
                              export=False),
            scl=SCLConfig(output_dim=8, projection_hidden=16, text_width=8, text_layers=1, text_heads=2,
                          max_tokens=8, num_oov_buckets=4, use_queue=use_queue, queue_size=13, momentum=0.9,
                          temperature_init=0.2, triplet_weight=0.5, triplet_margin=0.5)).validate()
        task = SCLTask(config)
        features, labels = next(iter(task.build_inputs("train", 8, training=False)))

        keras.utils.set_random_seed(0)
        single = task.build_model()
        with mirrored.scope():
            double = task.build_model()
        for a, b in zip(double.variables, single.variables):
            a.assign(b)
        if use_queue:  # a queue holding some of the batch's items (false negatives) and free slots
            qk = tf.math.l2_normalize(tf.constant(rng.normal(size=(6, 8)), tf.float32), axis=1)
            qi = tf.constant(np.r_[ids[:3], [90, 91, 92]], tf.int64)
            single.queue.enqueue(qk, qi)
            double.queue.enqueue(qk, qi)

        @tf.function
        def one():
            with tf.GradientTape() as tape:
                per, _ = task.per_example_loss(single, features, labels, training=True)
                loss = tf.reduce_mean(per)
            return per, loss, tape.gradient(loss, [v.value for v in single.trainable_variables])

        def split(ctx):
            r = ctx.replica_id_in_sync_group
            return ({k: v[4 * r:4 * r + 4] for k, v in features.items()}, labels[4 * r:4 * r + 4])

        parts = mirrored.experimental_distribute_values_from_function(split)

        @tf.function
        def two():
            def step(f, lab):
                with tf.GradientTape() as tape:
                    per, _ = task.per_example_loss(double, f, lab, training=True)
                    loss = tf.nn.compute_average_loss(per, global_batch_size=8)
                return per, loss, tape.gradient(loss, [v.value for v in double.trainable_variables])

            per, loss, grads = mirrored.run(step, args=parts)
            return (mirrored.experimental_local_results(per), mirrored.reduce("SUM", loss, axis=None),
                    [mirrored.reduce("SUM", g, axis=None) for g in grads])

        per1, loss1, grads1 = one()
        per2, loss2, grads2 = two()
        grads1, grads2 = ([tf.convert_to_tensor(g) for g in gs] for gs in (grads1, grads2))
        tag = "moco" if use_queue else "inbatch"
        out[f"{tag}_per_example_diff"] = float(np.max(np.abs(per1.numpy() - np.concatenate([p.numpy() for p in per2]))))
        out[f"{tag}_loss"] = [float(loss1), float(loss2)]
        out[f"{tag}_grad_diff"] = max(float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(grads1, grads2))
        out[f"{tag}_grad_scale"] = max(float(np.max(np.abs(a.numpy()))) for a in grads1)

        if not (use_queue or full):
            return
        # the real trainer, 3 steps: every replica holds the same queue / key encoder / weights, equal to 1 replica
        runs = {}
        for name, strategy in (("one", tf.distribute.get_strategy()), ("two", mirrored)):
            config.model_dir = f"{work_dir}/{tag}_{name}"
            trainer = Trainer(task, config.train, 8, config.model_dir, strategy)
            metrics = trainer.train()
            runs[name] = (trainer.model, metrics)
        model2 = runs["two"][0]
        spread = 0.0
        for v in model2.variables:
            copies = [c.numpy() for c in mirrored.experimental_local_results(v.value)]
            assert len(copies) == 2, v.path
            spread = max(spread, float(np.max(np.abs(copies[0].astype(np.float64) - copies[1]))))
        out[f"{tag}_replica_spread"] = spread
        out[f"{tag}_train_vs_single"] = max(
            float(np.max(np.abs(a.numpy().astype(np.float64) - b.numpy()))) for a, b in
            zip(runs["one"][0].variables, model2.variables))
        out[f"{tag}_acc1"] = [runs["one"][1]["acc@1"], runs["two"][1]["acc@1"]]
        if use_queue:
            out["queue_ids"] = [runs["one"][0].queue.ids.numpy().tolist(), model2.queue.ids.numpy().tolist()]
            out["queue_pointer_count"] = [int(model2.queue.pointer.numpy()), int(model2.queue.count.numpy())]
    for use_queue in (True, False):
        variant(use_queue)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], full="--full" in sys.argv[2:])
