//! Path parameters: an id that does not parse (not a UUID) is simply not found, so the answer
//! is `404 not_found` like an unknown id, never axum's plain-text `400`.

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::http::error::ApiError;

/// Path parameters deserialised into `T` (`Uuid`, or a tuple for several); any failure is
/// `404 not_found`. Put it after the authentication extractor, so 401 and 403 come first.
#[derive(Debug, Clone, Copy)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| Self(value))
            .map_err(|_| ApiError::not_found())
    }
}
