"""Herald's error hierarchy: every client-visible failure, with its Graph code and HTTP status.

* HeraldError              generalException        500
  + InvalidRequest         invalidRequest          400  (names the offending field)
  + Unauthenticated        InvalidAuthenticationToken 401
  + AccessDenied           accessDenied            403
    + QuotaExceeded        quotaLimitReached       403
  + NotFound               itemNotFound            404
  + MethodNotAllowed       methodNotAllowed        405
  + RequestTimeout         requestTimeout          408  (a request not received in time)
  + Conflict               conflict                409
  + Gone                   syncStateNotFound       410
  + PreconditionFailed     preconditionFailed      412
  + PayloadTooLarge        requestEntityTooLarge   413
  + UriTooLong             requestUriTooLong       414
  + UnsupportedMediaType   unsupportedMediaType    415
  + Throttled              activityLimitReached    429  (carries Retry-After)
  + HeadersTooLarge        requestHeaderFieldsTooLarge 431
  + Unavailable            serviceNotAvailable     503  (carries Retry-After)

Lower layers raise these; `api/errors.py` renders them as the Graph error body in one place.
"""

from __future__ import annotations


class HeraldError(Exception):
    code = "generalException"
    status = 500

    def __init__(
        self, message: str, *, retry_after: int | None = None, target: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.target = target  # the offending field, header or parameter, when there is one

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidRequest(HeraldError):
    code = "invalidRequest"
    status = 400


class Unauthenticated(HeraldError):
    code = "InvalidAuthenticationToken"
    status = 401


class AccessDenied(HeraldError):
    code = "accessDenied"
    status = 403


class QuotaExceeded(AccessDenied):
    code = "quotaLimitReached"


class NotFound(HeraldError):
    code = "itemNotFound"
    status = 404


class MethodNotAllowed(HeraldError):
    code = "methodNotAllowed"
    status = 405


class RequestTimeout(HeraldError):
    code = "requestTimeout"
    status = 408


class Conflict(HeraldError):
    code = "conflict"
    status = 409


class Gone(HeraldError):
    code = "syncStateNotFound"
    status = 410


class PreconditionFailed(HeraldError):
    code = "preconditionFailed"
    status = 412


class PayloadTooLarge(HeraldError):
    code = "requestEntityTooLarge"
    status = 413


class UriTooLong(HeraldError):
    code = "requestUriTooLong"
    status = 414


class UnsupportedMediaType(HeraldError):
    code = "unsupportedMediaType"
    status = 415


class HeadersTooLarge(HeraldError):
    code = "requestHeaderFieldsTooLarge"
    status = 431


class Throttled(HeraldError):
    code = "activityLimitReached"
    status = 429


class Unavailable(HeraldError):
    code = "serviceNotAvailable"
    status = 503
