"""The README's API example: train, choose a threshold, predict with early exit."""

from bnet_jax import cascade, checkpoint, cost, data, evaluate, selection, train
from experiments.configs import lenet_mnist

workdir = "workdirs/api"
train.train_and_evaluate(lenet_mnist.get_config("smoke"), workdir)  # Or "tuned", "paper".
evaluate.cache_exits(workdir)  # Every exit's logits on the validation and test splits.
val, test = evaluate.load_exits(workdir, "validation"), evaluate.load_exits(workdir, "test")
trained = checkpoint.load_trained(workdir)
segment_flops = cost.segment_flops(trained.net, trained.variables)
choice = selection.choose(val, test, "entropy", segment_flops, epsilon=0.001)  # On validation.
model = cascade.Cascade(trained.net, trained.variables, choice["thresholds"])
images = data.preprocess("mnist", data.load("mnist", "test").images[:8])
print(model.predict(images))  # Prediction(label=..., exit=..., score=...) per image.
