from common.errors import (
    Conflict,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unprocessable,
    UnsupportedMediaType,
)


class ProductNotFound(NotFound):
    slug = "product-not-found"
    title = "Product not found"


class ImageNotFound(NotFound):
    slug = "image-not-found"
    title = "Image not found"


class ReservationNotFound(NotFound):
    slug = "reservation-not-found"
    title = "Reservation not found"


class DuplicateSku(Conflict):
    slug = "duplicate-sku"
    title = "SKU already in use"


class StockBelowReserved(Conflict):
    slug = "stock-below-reserved"
    title = "On-hand stock cannot drop below reserved stock"


class InsufficientStock(Conflict):
    slug = "insufficient-stock"
    title = "Not enough stock"


class ReservationClosed(Conflict):
    slug = "reservation-closed"
    title = "The reservation is no longer held"


class ReservationMismatch(Unprocessable):
    slug = "reservation-mismatch"
    title = "This reservation id was used with other items"
    loc = ("body", "reservation_id")


class UnknownProducts(Unprocessable):
    slug = "unknown-products"
    title = "Unknown products"


class TooManyImages(Conflict):
    slug = "too-many-images"
    title = "Too many images"


class ImageTooLarge(PayloadTooLarge):
    slug = "image-too-large"
    title = "Image too large"


class UnsupportedImageType(UnsupportedMediaType):
    slug = "unsupported-image-type"
    title = "Only JPEG, PNG and WebP images are accepted"


class InvalidImage(Unprocessable):
    slug = "invalid-image"
    title = "The file is not a valid image"
    loc = ("body", "file")


class ImageStorageUnavailable(ServiceUnavailable):
    slug = "image-storage-unavailable"
    title = "Image storage unavailable"

    def __init__(self) -> None:
        # The disk is full or read-only: an operator must act, so a minute rather than at once.
        super().__init__(
            "The image could not be stored; nothing was changed. Try again later.", headers={"Retry-After": "60"}
        )
