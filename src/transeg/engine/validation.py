"""Evaluation during training: the validation result, its log record and console line, the charts it
draws (val_iou.png and confusion.png at each evaluation, curves.png of the whole log at the end),
best.safetensors, and the count of evaluations without a gain that early_stop reads."""
from ..charts import confusion_chart, curves_chart, iou_chart
from ..checkpoint import save
from ..files import atomic_write
from .evaluate import evaluate


class Validation:
    """Evaluates the model on `data` (this process's share of the validation set; the result is
    all-reduced, so every rank gets the same) per `protocol`. best: the best value of cfg.best_metric so
    far; stale: evaluations since it last improved; result: the last result (None before the first).
    Rank 0 (`main`) writes the record, the charts and best.safetensors into `out`."""

    def __init__(self, cfg, data, protocol, device, amp_dtype, out, main, best=-1.0, stale=0):
        self.cfg, self.data, self.protocol, self.device, self.amp_dtype = cfg, data, protocol, device, amp_dtype
        self.out, self.main = out, main
        self.best, self.stale, self.result = best, stale, None

    def __call__(self, model, net, done, folder, bar):
        """Evaluate `model` at iteration `done`, then put `net` (the model as trained: DDP, compiled) back
        into training mode. `folder`: the run's log (`RunFolder`); `bar`: the progress bar to print on."""
        cfg = self.cfg
        result = self.result = evaluate(model, self.data, self.protocol, self.device, self.amp_dtype, progress=False)
        net.train()
        if self.main:
            keys = dict.fromkeys(("mIoU", "mAcc", "aAcc", cfg.best_metric))  # (ordered, once each)
            folder.write({"iter": done, **{k: round(result[k], 5) for k in keys}})
            bar.write(f"iter {done}: mIoU {100 * result['mIoU']:.2f}  mAcc {100 * result['mAcc']:.2f}  "
                      f"aAcc {100 * result['aAcc']:.2f}")
            self._charts(model, result, done)
            if result[cfg.best_metric] > self.best:
                save(model, self.out / "best.safetensors")
        # every rank keeps the count (the result is all-reduced), so all stop together
        self.stale = 0 if result[cfg.best_metric] > self.best else self.stale + 1
        self.best = max(self.best, result[cfg.best_metric])
        return result

    def _charts(self, model, result, done):
        """val_iou.png (IoU per class) and confusion.png of the evaluation at iteration `done`."""
        name = self.cfg.model
        chart = iou_chart(result, model.classes, model.meta["palette"], title=f"{name} iter {done}")
        atomic_write(self.out / "val_iou.png", lambda tmp: chart.save(tmp, format="PNG"))
        matrix = confusion_chart(result, model.classes, title=f"{name} iter {done}: validation confusion")
        atomic_write(self.out / "confusion.png", lambda tmp: matrix.save(tmp, format="PNG"))


def write_curves(out, records, cfg, model):
    """curves.png: loss and mIoU over the run's log `records`."""
    chart = curves_chart(records, keys=("loss", "mIoU"), title=f"{cfg.model} on {model.meta['dataset']}")
    atomic_write(out / "curves.png", lambda tmp: chart.save(tmp, format="PNG"))
