"""A Python ClientApp for the Flower SuperNode of the test: it moves every
parameter a little (deterministically) and reports 64 examples."""
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    named = ArrayRecord({k: Array(v.numpy() * 0.5 + 0.01) for k, v in arrays.items()})
    metrics = MetricRecord({"train_loss": 1.0, "num-examples": 64})
    return Message(RecordDict({"arrays": named, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    metrics = MetricRecord({"loss": 2.0, "accuracy": 0.1, "num-examples": 16})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
