use std::fmt;

/// Why one resource cannot be used. Names the resource, the field and the reason, so a
/// user can find the line to fix without reading Gatehouse's code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ResourceError {
    /// `Kind namespace/name`, or where the resource could not even be identified, the
    /// file and document it came from.
    pub resource: String,
    /// Dotted path inside the resource, e.g. `spec.upstream.timeout`; empty when the
    /// problem is the whole document.
    pub field: String,
    pub reason: String,
}

impl ResourceError {
    pub fn new(resource: impl Into<String>, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { resource: resource.into(), field: field.into(), reason: reason.into() }
    }
}

impl fmt::Display for ResourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.resource, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.resource, self.field, self.reason)
        }
    }
}
