"""Make TensorFlow checkpoints for the tests of `safeckpt.sources.tf_checkpoint`, with TensorFlow's own answers.

    python scripts/make_tf_fixtures.py OUT_DIR     # tests/fixtures/tf/ holds its output (about 90 KB)

The tests run it once more into a temporary directory when TensorFlow is installed, so
that the reader is also checked against what the installed TensorFlow writes.

Writes, under OUT_DIR:

- ``keras/ckpt-1.*``: a Keras model (two Dense layers) and its Adam optimizer after two training steps,
  saved by ``tf.train.Checkpoint``; ``manager/``: the same saved twice by ``tf.train.CheckpointManager``
  (with its ``checkpoint`` state file);
- ``module/ckpt``: a ``tf.Module`` whose two variables have the same name, with a TF1-style Adam
  (slot variables ``m`` and ``v``) and a ``step`` variable, saved by ``tf.train.Checkpoint``;
- ``sharded/ckpt``: three variables in three data files (``MaxShardSizePolicy`` of 200 bytes), the
  largest split into two slices;
- ``saved_model/``: ``tf.saved_model.save`` of a ``tf.Module`` with two variables;
- ``sliced/model``: TF1 graph variables split by partitioners (one in three by rows, one in two by
  columns) and a plain one, saved by ``tf.compat.v1.train.Saver`` (its index holds ``slices`` entries);
- ``dtypes/all``: one tensor of every TF dtype that has a safetensors dtype, a string tensor (text and
  bytes that are not UTF-8) and an empty tensor, saved by ``tf.raw_ops.SaveV2``; ``dtypes/slices``:
  a tensor saved as two slices and one saved only in part.

Next to each checkpoint prefix ``P`` goes ``P.oracle.json``: every key TensorFlow's reader
(``tf.train.load_checkpoint(P)``) lists, with its dtype, shape and either the hex of its bytes
(``tobytes()``, C order) or, for strings, the values' hex, or the error TensorFlow raised. The tests
compare what safeckpt reads with it.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import tensorflow as tf


def write_oracle(prefix: str) -> None:
    """``prefix.oracle.json``: what TensorFlow's own reader gives for every key of the checkpoint."""
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    out = {}
    for key, shape in sorted(reader.get_variable_to_shape_map().items()):
        entry = {"dtype": dtypes[key].name, "shape": list(shape)}
        try:
            value = reader.get_tensor(key)
        except (ValueError, tf.errors.OpError) as exc:  # a partly saved tensor: TensorFlow cannot read it either
            out[key] = dict(entry, error=type(exc).__name__)
            continue
        if dtypes[key] == tf.string:
            entry["strings"] = [bytes(v).hex() for v in np.asarray(value, dtype=object).reshape(-1)]
        else:
            entry["hex"] = np.ascontiguousarray(value).tobytes().hex()
        out[key] = entry
    with open(prefix + ".oracle.json", "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)


def keras_checkpoints(out: str) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="hidden"),
                              keras.layers.Dense(2, name="head")], name="tiny")
    optimizer = keras.optimizers.Adam(0.01)
    x, y = np.arange(24, dtype=np.float32).reshape(8, 3) / 10, np.ones((8, 2), np.float32)
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    write_oracle(checkpoint.write(os.path.join(out, "keras", "ckpt-1")))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model, optimizer=optimizer),
                                         os.path.join(out, "manager"), max_to_keep=2)
    manager.save()
    write_oracle(manager.save())


def module_with_slots(out: str) -> None:
    module = tf.Module()
    module.w, module.b = tf.Variable([1.0, 2.0]), tf.Variable([3.0])  # both named "Variable"
    optimizer = tf.compat.v1.train.AdamOptimizer(0.1)  # keeps TF-style slot variables
    optimizer.minimize(lambda: tf.reduce_sum(module.w * module.b), var_list=[module.w, module.b])
    checkpoint = tf.train.Checkpoint(model=module, optimizer=optimizer, step=tf.Variable(7, dtype=tf.int64))
    write_oracle(checkpoint.write(os.path.join(out, "module", "ckpt")))


def sharded(out: str) -> None:
    module = tf.Module()
    module.a = tf.Variable(np.arange(40, dtype=np.float32))
    module.b = tf.Variable(np.arange(30, dtype=np.float64) / 7)  # 240 bytes: split into two slices
    module.c = tf.Variable(np.arange(8, dtype=np.int32))
    policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=200)
    options = tf.train.CheckpointOptions(experimental_sharding_callback=policy)
    write_oracle(tf.train.Checkpoint(model=module).write(os.path.join(out, "sharded", "ckpt"), options=options))


def saved_model(out: str) -> None:
    module = tf.Module()
    module.weight = tf.Variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="weight")
    module.bias = tf.Variable(np.array([0.5, -1.5], np.float64), name="bias")
    tf.saved_model.save(module, os.path.join(out, "saved_model"))
    write_oracle(os.path.join(out, "saved_model", "variables", "variables"))


def sliced(out: str) -> None:
    prefix = os.path.join(out, "sliced", "model")
    with tf.Graph().as_default():
        tf.compat.v1.get_variable(
            "layer/part", shape=[7, 3], dtype=tf.float32, partitioner=tf.compat.v1.fixed_size_partitioner(3),
            initializer=tf.compat.v1.random_normal_initializer(seed=1))
        tf.compat.v1.get_variable(
            "cols", shape=[2, 5], dtype=tf.int32, partitioner=tf.compat.v1.fixed_size_partitioner(2, axis=1),
            initializer=tf.compat.v1.random_uniform_initializer(0, 100, dtype=tf.int32, seed=2))
        tf.compat.v1.get_variable("plain", initializer=np.float32([1, 2]))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, prefix, write_meta_graph=False)
    write_oracle(prefix)


def all_dtypes(out: str) -> None:
    prefix = os.path.join(out, "dtypes", "all")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    base = np.array([[0, 1, 2], [3, 100, 7]])
    tensors = {
        "float": tf.constant(base / 3, tf.float32), "double": tf.constant(base / 7, tf.float64),
        "int32": tf.constant(-base, tf.int32), "uint8": tf.constant(base + 150, tf.uint8),
        "int16": tf.constant(-base * 300, tf.int16), "int8": tf.constant(-base, tf.int8),
        "complex64": tf.constant(base + 2j * base, tf.complex64), "int64": tf.constant(-base << 40, tf.int64),
        "bool": tf.constant(base % 2 == 1), "bfloat16": tf.constant(base / 3, tf.bfloat16),
        "uint16": tf.constant(base + 60000, tf.uint16), "half": tf.constant(base / 3, tf.float16),
        "uint32": tf.constant(base + 4_000_000_000, tf.uint32),
        "uint64": tf.constant(base.astype(np.uint64) + np.uint64(1 << 63), tf.uint64),
        "complex128": tf.constant(base - 1j * base, tf.complex128),
        "scalar": tf.constant(3.5, tf.float32), "empty": tf.zeros([0, 4], tf.float32),
        "text": tf.constant([["hello", "wörld", ""], ["a", "b", "c" * 200]]),
        "bytes": tf.constant([b"\xff\xfe not utf-8", b"ok"]),
    }
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tensors[n] for n in names])
    # variables saved as slices of larger tensors: "wide" in two halves (starts past 127 take two bytes
    # in the slice keys), "big" only in part (TensorFlow's reader cannot return it)
    sliced_prefix = os.path.join(out, "dtypes", "slices")
    wide = np.arange(600, dtype=np.int16).reshape(2, 300)
    tf.raw_ops.SaveV2(prefix=sliced_prefix, tensor_names=["big", "wide", "wide"],
                      shape_and_slices=["200 3 100,2:-", "2 300 -:0,150", "2 300 -:150,150"],
                      tensors=[tf.constant(np.arange(6, dtype=np.float32).reshape(2, 3)),
                               tf.constant(wide[:, :150]), tf.constant(wide[:, 150:])])
    write_oracle(sliced_prefix)
    write_oracle(prefix)


def main(argv: list[str]) -> None:
    out = argv[0]
    os.makedirs(out, exist_ok=True)
    keras_checkpoints(out)
    module_with_slots(out)
    sharded(out)
    saved_model(out)
    sliced(out)
    all_dtypes(out)


if __name__ == "__main__":
    main(sys.argv[1:])
