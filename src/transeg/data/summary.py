"""What a dataset holds, read item by item: class pixels and images, sizes, label values."""
import numpy as np
from tqdm import tqdm


def summarize(dataset, progress=True):
    """The summary `FolderDataset.check` gives (class pixels and images, sizes, label values), made by
    reading every item of any dataset: for data that is generated, not read from files (the
    synthetic set), so `transeg data check synthetic:...` shows its class balance like a folder's."""
    k = len(dataset.classes)
    ignore = getattr(dataset, "ignore_index", 255)
    hist = np.zeros(256, dtype=np.int64)
    class_images = np.zeros(k, dtype=np.int64)
    min_size = max_size = None
    for i in tqdm(range(len(dataset)), desc="checking", unit="img", disable=not progress, leave=False):
        label = dataset[i]["label"].numpy()
        counts = np.bincount(label.reshape(-1), minlength=256)
        hist += counts
        present = np.nonzero(counts[:k])[0]
        class_images[present] += 1
        size = label.shape
        min_size = size if min_size is None else (min(min_size[0], size[0]), min(min_size[1], size[1]))
        max_size = size if max_size is None else (max(max_size[0], size[0]), max(max_size[1], size[1]))
    return {
        "num_images": len(dataset),
        "num_classes": k,
        "classes": list(dataset.classes),
        "class_pixels": [int(c) for c in hist[:k]],
        "ignore_pixels": int(hist[ignore]),
        "total_pixels": int(hist.sum()),
        "class_images": [int(c) for c in class_images],
        "absent_classes": [dataset.classes[i] for i in range(k) if hist[i] == 0],
        "min_size": min_size,
        "max_size": max_size,
        "label_values": [int(v) for v in np.nonzero(hist)[0]],
    }
