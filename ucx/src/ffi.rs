//! Declarations of the C shim (csrc/shim.c), and nothing else: UCX itself is only ever called
//! from C, so no UCX struct layout is written in Rust. Handles are opaque pointers; statuses are
//! `ucs_status_t` widened to `c_int` by the shim.

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `ucp_context_h`.
pub type ContextHandle = *mut c_void;
/// `ucp_worker_h`.
pub type WorkerHandle = *mut c_void;
/// `ucp_ep_h`.
pub type EpHandle = *mut c_void;
/// `ucp_mem_h`.
pub type MemHandle = *mut c_void;
/// `ucp_rkey_h`.
pub type RkeyHandle = *mut c_void;
/// A UCP request (`ucs_status_ptr_t` that is neither NULL nor an error).
pub type RequestHandle = *mut c_void;

unsafe extern "C" {
    pub static tandem_ucs_ok: c_int;
    pub static tandem_ucs_inprogress: c_int;
    pub static tandem_ucs_err_busy: c_int;
    pub static tandem_ucs_err_canceled: c_int;
    pub static tandem_ucs_err_unreachable: c_int;

    pub fn tandem_ucs_status_string(status: c_int) -> *const c_char;

    pub fn tandem_ucp_init(
        names: *const *const c_char,
        values: *const *const c_char,
        count: usize,
        context_out: *mut ContextHandle,
    ) -> c_int;
    pub fn tandem_ucp_cleanup(context: ContextHandle);

    pub fn tandem_worker_create(context: ContextHandle, worker_out: *mut WorkerHandle) -> c_int;
    pub fn tandem_worker_destroy(worker: WorkerHandle);
    pub fn tandem_worker_get_address(
        worker: WorkerHandle,
        address_out: *mut *mut c_void,
        length_out: *mut usize,
    ) -> c_int;
    pub fn tandem_worker_release_address(worker: WorkerHandle, address: *mut c_void);
    pub fn tandem_worker_progress(worker: WorkerHandle) -> c_uint;
    pub fn tandem_worker_get_efd(worker: WorkerHandle, fd_out: *mut c_int) -> c_int;
    pub fn tandem_worker_arm(worker: WorkerHandle) -> c_int;

    pub fn tandem_ep_create(
        worker: WorkerHandle,
        address: *const c_void,
        peer_error_handling: c_int,
        error_slot: *mut c_int,
        ep_out: *mut EpHandle,
    ) -> c_int;
    pub fn tandem_ep_close(ep: EpHandle, force: c_int, request_out: *mut RequestHandle) -> c_int;

    pub fn tandem_ep_flush(ep: EpHandle, request_out: *mut RequestHandle) -> c_int;
    pub fn tandem_request_check_status(request: RequestHandle) -> c_int;
    pub fn tandem_request_free(request: RequestHandle);

    pub fn tandem_mem_map(
        context: ContextHandle,
        address: *mut c_void,
        length: usize,
        memh_out: *mut MemHandle,
    ) -> c_int;
    pub fn tandem_mem_alloc(
        context: ContextHandle,
        length: usize,
        memh_out: *mut MemHandle,
        address_out: *mut *mut c_void,
    ) -> c_int;
    pub fn tandem_mem_unmap(context: ContextHandle, memh: MemHandle) -> c_int;
    pub fn tandem_rkey_pack(
        context: ContextHandle,
        memh: MemHandle,
        buffer_out: *mut *mut c_void,
        length_out: *mut usize,
    ) -> c_int;
    pub fn tandem_rkey_buffer_release(buffer: *mut c_void);
    pub fn tandem_rkey_unpack(
        ep: EpHandle,
        buffer: *const c_void,
        rkey_out: *mut RkeyHandle,
    ) -> c_int;
    pub fn tandem_rkey_destroy(rkey: RkeyHandle);

    pub fn tandem_get(
        ep: EpHandle,
        buffer: *mut c_void,
        length: usize,
        remote_address: u64,
        rkey: RkeyHandle,
        request_out: *mut RequestHandle,
    ) -> c_int;
}

/// `UCS_OK`.
pub fn ok() -> c_int {
    // SAFETY: an immutable `const int` defined in the shim.
    unsafe { tandem_ucs_ok }
}

/// `UCS_INPROGRESS`.
pub fn in_progress() -> c_int {
    // SAFETY: an immutable `const int` defined in the shim.
    unsafe { tandem_ucs_inprogress }
}

/// `UCS_ERR_BUSY`.
pub fn err_busy() -> c_int {
    // SAFETY: an immutable `const int` defined in the shim.
    unsafe { tandem_ucs_err_busy }
}

/// `UCS_ERR_CANCELED`.
pub fn err_canceled() -> c_int {
    // SAFETY: an immutable `const int` defined in the shim.
    unsafe { tandem_ucs_err_canceled }
}

/// `UCS_ERR_UNREACHABLE`.
pub fn err_unreachable() -> c_int {
    // SAFETY: an immutable `const int` defined in the shim.
    unsafe { tandem_ucs_err_unreachable }
}

/// UCX's own text for a status (`ucs_status_string`).
pub fn status_string(status: c_int) -> String {
    // SAFETY: ucs_status_string returns a pointer to a static NUL-terminated string for any value.
    let text = unsafe { std::ffi::CStr::from_ptr(tandem_ucs_status_string(status)) };
    text.to_string_lossy().into_owned()
}
