from common.errors import NotFound


class ProductNotFound(NotFound):
    slug = "product-not-found"
    title = "Product not found"
