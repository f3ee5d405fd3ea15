//! The UCP context: one per process (or per transfer thread), created with RMA and WAKEUP and
//! configured from the environment, so `UCX_TLS`, `UCX_NET_DEVICES` etc. apply as usual; explicit
//! overrides ([`Context::with_config`]) let one process hold contexts with different transports
//! without touching its environment.

use std::ffi::CString;
use std::rc::Rc;

use crate::error::{Result, UcxError, check};
use crate::ffi;

/// A UCP context. Cheap to clone (reference counted); the last clone cleans the context up, and
/// every worker and memory region holds a clone, so the context always outlives them.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Rc<ContextInner>,
}

pub(crate) struct ContextInner {
    pub(crate) handle: ffi::ContextHandle,
}

impl Context {
    /// `ucp_init` with `UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP`, configuration read from `UCX_*`
    /// environment variables.
    pub fn new() -> Result<Self> {
        Self::with_config(&[])
    }

    /// Like [`Context::new`], then applies `overrides` (`ucp_config_modify`): names without the
    /// `UCX_` prefix, e.g. `[("TLS", "tcp")]`.
    pub fn with_config(overrides: &[(&str, &str)]) -> Result<Self> {
        let to_c = |text: &str| {
            CString::new(text).map_err(|_| UcxError::Invalid {
                what: "UCX config entry",
                reason: format!("{text:?} contains a NUL byte"),
            })
        };
        let names = overrides
            .iter()
            .map(|(name, _)| to_c(name))
            .collect::<Result<Vec<_>>>()?;
        let values = overrides
            .iter()
            .map(|(_, value)| to_c(value))
            .collect::<Result<Vec<_>>>()?;
        let name_ptrs: Vec<_> = names.iter().map(|n| n.as_ptr()).collect();
        let value_ptrs: Vec<_> = values.iter().map(|v| v.as_ptr()).collect();
        let mut handle = std::ptr::null_mut();
        // SAFETY: both arrays hold `len` valid C strings that outlive the call; the out pointer
        // is valid and filled on success.
        check("ucp_init", unsafe {
            ffi::tandem_ucp_init(
                name_ptrs.as_ptr(),
                value_ptrs.as_ptr(),
                name_ptrs.len(),
                &mut handle,
            )
        })?;
        Ok(Self {
            inner: Rc::new(ContextInner { handle }),
        })
    }
}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: workers and memory regions hold an Rc of this, so none is left.
        unsafe { ffi::tandem_ucp_cleanup(self.handle) };
    }
}
