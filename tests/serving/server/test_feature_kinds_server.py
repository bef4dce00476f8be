"""The prediction server's Predict with string and numeric inputs (gRPC `string_val`, REST JSON strings)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from mm_ads.config import CTRModelConfig
from mm_ads.ctr.model import build_ctr_model
from mm_ads.export.saved_model import export_saved_model
from mm_ads.serving.server.prediction_server import PredictionServer, ServerConfig
from tests.ctr.test_feature_kinds import feature_spec
from tests.serving.server import server_helpers as h

ROWS = {
    "user_id": [3, 4], "age": [50.0, 21.5], "income": [10.0, 60.0], "occupation": ["doctor", "ingénieur"],
    "item_id": [5, 6], "category_id": [2, 3], "brand_id": [3, 1],
    "genres": [["Comedy", "", ""], ["Drama", "Horror", ""]],
    "hist_item_id": [[0, 0, 4, 9], [1, 2, 3, 4]], "hist_query": [["", "", "q4", "q2"], ["q1", "q1", "q3", "q2"]],
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("kinds_serving") / "export")
    spec = feature_spec()
    keras.utils.set_random_seed(3)
    model = build_ctr_model(spec, CTRModelConfig(variant="id", embedding_dim=4, attention_units=(8,), mlp_units=(8,),
                                                 admit_after=0))
    export_saved_model(model, base, version=1, spec=spec)
    config = ServerConfig(model_base_path=base, grpc_port=0, rest_port=0, poll_interval_s=30, warmup_batch_sizes=(1,))
    server = PredictionServer(config).start()
    yield model, server
    server.stop()


def test_grpc_and_rest_predict_take_strings_and_floats(served):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    model, server = served
    expected = model({k: tf.constant(v) for k, v in ROWS.items()}, training=False)["ctr"].numpy()
    assert abs(expected[0] - expected[1]) > 1e-6
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ctr"
    for f in feature_spec().model_features:
        value = np.array(ROWS[f.name])
        value = np.char.encode(value, "utf-8").astype(object) if f.dtype == "string" else value.astype(f.dtype)
        request.inputs[f.name].CopyFrom(tf.make_tensor_proto(value))
    assert request.inputs["occupation"].string_val == [b"doctor", "ingénieur".encode()]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["ctr"]), expected, rtol=1e-6, atol=1e-7)
    status, body = h.rest_call(server.rest_port, "POST", "/v1/models/ctr:predict", {"inputs": ROWS})
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"], expected, rtol=1e-6, atol=1e-7)
    instances = [{k: v[i] for k, v in ROWS.items()} for i in range(2)]
    status, body = h.rest_call(server.rest_port, "POST", "/v1/models/ctr:predict", {"instances": instances})
    assert status == 200, body
    np.testing.assert_allclose(body["predictions"], expected, rtol=1e-6, atol=1e-7)
    # a number where the signature takes strings is refused, naming the input
    status, body = h.rest_call(server.rest_port, "POST", "/v1/models/ctr:predict",
                               {"inputs": {**ROWS, "occupation": [1, 2]}})
    assert status == 400 and "input 'occupation': expected strings" in body["error"]
