"""The inspection service: a REST API and a review page over the task functions (``fewvision serve``)."""
