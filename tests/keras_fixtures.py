"""Make the Keras fixtures of tests/test_keras.py with the real Keras (run as a script).

    python tests/keras_fixtures.py OUT_DIR

Run in a subprocess of its own: importing tensorflow into the pytest process is not
allowed (importing it after jax crashes). Writes into OUT_DIR:

- ``m.keras`` and ``m.weights.h5``: a functional model (Conv2D, BatchNormalization, an
  Embedding, a nested Sequential, Dense) compiled with Adam and trained two steps;
- ``bf16.keras`` and ``bf16.weights.h5``: a model whose variables are bfloat16;
- ``m.h5``: the same model in the legacy (Keras 2) HDF5 format;
- ``rnn.keras`` and ``rnn.weights.h5``: an LSTM and a MultiHeadAttention (variables of
  objects held in attributes: ``lstm.cell.kernel``, ``attention.query_dense.kernel``);
- ``lambda.keras``: a model with a Lambda layer (its function is saved as marshalled bytecode);
- ``expected.npz``: every variable as Keras gives it, under the name our reader should give
  it (``m.<name>``, ``bf16.<name>``, ``m.optimizer.vars.<i>``), and ``expected.json``: the layer
  names and the order of ``model.weights`` by variable path.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np


def own_variables(layer, prefix: str, out: dict) -> None:
    """The variables of `layer` and its nested layers, named as the reader names them."""
    import keras
    name = f"{prefix}{layer.name}"
    if isinstance(layer, keras.Model):
        for inner in layer.layers:
            own_variables(inner, f"{name}.", out)
        return
    children = {"cell": getattr(layer, "cell", None),
                **{part: getattr(layer, f"_{part}", None)
                   for part in ("query_dense", "key_dense", "value_dense", "output_dense")}}
    for attr, child in children.items():
        for v in child._trainable_variables + child._non_trainable_variables if child is not None else ():
            out[f"{name}.{attr}.{v.name}"] = np.asarray(keras.ops.convert_to_numpy(v))
    for v in layer._trainable_variables + layer._non_trainable_variables:
        out[f"{name}.{v.name}"] = np.asarray(keras.ops.convert_to_numpy(v))


def main_model():
    import keras
    from keras import layers
    image = keras.Input((8, 8, 3), name="image")
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    x = layers.Conv2D(4, 3, name="conv")(image)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.GlobalAveragePooling2D()(x)
    t = layers.Embedding(20, 3, name="embed")(tokens)
    t = layers.Flatten()(t)
    h = layers.Concatenate()([x, t])
    h = layers.Dense(16, activation="relu")(h)
    h = layers.LayerNormalization()(h)
    inner = keras.Sequential([keras.Input((16,)), layers.Dense(8, name="inner_a"),
                              layers.Dense(4, use_bias=False, name="inner_b")], name="block")
    h = inner(h)
    out = layers.Dense(1)(h)
    return keras.Model([image, tokens], out, name="main")


def bf16_model():
    import keras
    from keras import layers
    return keras.Sequential([keras.Input((6,)), layers.Dense(5, dtype="bfloat16", name="d0"),
                             layers.Dense(2, dtype="bfloat16", name="d1")], name="half")


def rnn_model():
    import keras
    from keras import layers
    sequence = keras.Input((4, 3))
    x = layers.LSTM(5, return_sequences=True, name="lstm")(sequence)
    x = layers.MultiHeadAttention(num_heads=2, key_dim=2, name="attention")(x, x)
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(sequence, layers.Dense(1, name="head")(x), name="rnn")


def lambda_model():
    import keras
    from keras import layers
    return keras.Sequential([keras.Input((3,)), layers.Lambda(lambda x: x * 2, name="double"),
                             layers.Dense(2)], name="with_lambda")


def main(out_dir: str) -> None:
    import keras
    keras.utils.set_random_seed(0)
    expected: dict = {}
    layout: dict = {}

    model = main_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(8, 8, 8, 3)).astype("float32"), rng.integers(0, 20, size=(8, 5))]
    model.fit(inputs, rng.normal(size=(8, 1)).astype("float32"), batch_size=4, epochs=1, verbose=0)
    model.save(os.path.join(out_dir, "m.keras"))
    model.save_weights(os.path.join(out_dir, "m.weights.h5"))
    model.save(os.path.join(out_dir, "m.h5"))  # the legacy format (a warning says so)
    named: dict = {}
    for layer in model.layers:
        own_variables(layer, "", named)
    expected.update({f"m.{k}": v for k, v in named.items()})
    expected.update({f"m.optimizer.vars.{i}": np.asarray(keras.ops.convert_to_numpy(v))
                     for i, v in enumerate(model.optimizer.variables)})
    layout["m"] = {"names": list(named), "weights": [v.path for v in model.weights],
                   "optimizer": [v.name for v in model.optimizer.variables]}

    half = bf16_model()
    half.save(os.path.join(out_dir, "bf16.keras"))
    half.save_weights(os.path.join(out_dir, "bf16.weights.h5"))
    named = {}
    for layer in half.layers:
        own_variables(layer, "", named)
    expected.update({f"bf16.{k}": v.astype("float32") for k, v in named.items()})
    layout["bf16"] = {"names": list(named), "dtypes": {k: str(v.dtype) for k, v in named.items()}}

    rnn = rnn_model()
    rnn.save(os.path.join(out_dir, "rnn.keras"))
    rnn.save_weights(os.path.join(out_dir, "rnn.weights.h5"))
    named = {}
    for layer in rnn.layers:
        own_variables(layer, "", named)
    expected.update({f"rnn.{k}": v for k, v in named.items()})
    layout["rnn"] = {"names": list(named)}

    lambda_model().save(os.path.join(out_dir, "lambda.keras"))

    np.savez(os.path.join(out_dir, "expected.npz"), **expected)
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(layout, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
