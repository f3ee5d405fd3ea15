/*
 * Thin C shim over libucp for tandem-ucx.
 *
 * Why a shim: UCX's parameter structs (ucp_params_t, ucp_worker_params_t, ucp_ep_params_t,
 * ucp_mem_map_params_t, ucp_request_param_t) carry field masks, unions and version-dependent
 * padding. Filling them here, with the real headers, means the C compiler lays them out; Rust only
 * sees functions taking plain pointers, integers and sizes, so no struct layout is ever written by
 * hand on the Rust side. `ucp_init` is a static inline (around ucp_init_version) and is only
 * reachable from C anyway.
 *
 * Conventions: every function returns a ucs_status_t widened to int. Non-blocking operations
 * return UCS_OK when done at once, UCS_INPROGRESS with the request in *request_out, or an error.
 */
#include <stdint.h>
#include <string.h>
#include <ucp/api/ucp.h>

/* Status values the Rust side needs, exported so they are never duplicated by hand. */
const int tandem_ucs_ok = UCS_OK;
const int tandem_ucs_inprogress = UCS_INPROGRESS;
const int tandem_ucs_err_busy = UCS_ERR_BUSY;
const int tandem_ucs_err_canceled = UCS_ERR_CANCELED;
const int tandem_ucs_err_unreachable = UCS_ERR_UNREACHABLE;

const char *tandem_ucs_status_string(int status) {
    return ucs_status_string((ucs_status_t)status);
}

/* Context with RMA and WAKEUP, configured from the environment (UCX_TLS, UCX_NET_DEVICES, ...),
 * then overridden by `count` name/value pairs (names without the UCX_ prefix, e.g. "TLS"). */
int tandem_ucp_init(const char *const *names, const char *const *values, size_t count,
                    ucp_context_h *context_out) {
    ucp_config_t *config = NULL;
    ucs_status_t status = ucp_config_read(NULL, NULL, &config);
    if (status != UCS_OK) {
        return status;
    }
    for (size_t i = 0; i < count; ++i) {
        status = ucp_config_modify(config, names[i], values[i]);
        if (status != UCS_OK) {
            ucp_config_release(config);
            return status;
        }
    }
    ucp_params_t params;
    memset(&params, 0, sizeof(params));
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
    params.mt_workers_shared = 0;
    status = ucp_init(&params, config, context_out);
    ucp_config_release(config);
    return status;
}

void tandem_ucp_cleanup(ucp_context_h context) { ucp_cleanup(context); }

/* A worker used from a single thread only (UCS_THREAD_MODE_SINGLE: no internal locking). */
int tandem_worker_create(ucp_context_h context, ucp_worker_h *worker_out) {
    ucp_worker_params_t params;
    memset(&params, 0, sizeof(params));
    params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    params.thread_mode = UCS_THREAD_MODE_SINGLE;
    return ucp_worker_create(context, &params, worker_out);
}

void tandem_worker_destroy(ucp_worker_h worker) { ucp_worker_destroy(worker); }

int tandem_worker_get_address(ucp_worker_h worker, void **address_out, size_t *length_out) {
    ucp_address_t *address = NULL;
    ucs_status_t status = ucp_worker_get_address(worker, &address, length_out);
    *address_out = address;
    return status;
}

void tandem_worker_release_address(ucp_worker_h worker, void *address) {
    ucp_worker_release_address(worker, (ucp_address_t *)address);
}

unsigned tandem_worker_progress(ucp_worker_h worker) { return ucp_worker_progress(worker); }

int tandem_worker_get_efd(ucp_worker_h worker, int *fd_out) {
    return ucp_worker_get_efd(worker, fd_out);
}

int tandem_worker_arm(ucp_worker_h worker) { return ucp_worker_arm(worker); }

/* Endpoint error handler: records the failure in the int the Rust side owns (arg). It runs inside
 * ucp_worker_progress on the worker's thread, so a plain store is enough. */
static void tandem_ep_error_cb(void *arg, ucp_ep_h ep, ucs_status_t status) {
    (void)ep;
    *(int *)arg = (int)status;
}

/* Endpoint to a peer's packed worker address. With peer_error_handling, UCX completes outstanding
 * requests with an error when the peer dies (instead of leaving them pending) and calls the error
 * callback; UCX 1.13's shared-memory transports cannot do that, and ucp_ep_create then fails with
 * UCS_ERR_UNREACHABLE. Without it, the callback is still installed but never called. */
int tandem_ep_create(ucp_worker_h worker, const void *address, int peer_error_handling,
                     int *error_slot, ucp_ep_h *ep_out) {
    ucp_ep_params_t params;
    memset(&params, 0, sizeof(params));
    params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                        UCP_EP_PARAM_FIELD_ERR_HANDLER;
    params.address = (const ucp_address_t *)address;
    params.err_mode =
        peer_error_handling ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    params.err_handler.cb = tandem_ep_error_cb;
    params.err_handler.arg = error_slot;
    return ucp_ep_create(worker, &params, ep_out);
}

static int tandem_status_ptr(ucs_status_ptr_t ptr, void **request_out) {
    *request_out = NULL;
    if (ptr == NULL) {
        return UCS_OK;
    }
    if (UCS_PTR_IS_ERR(ptr)) {
        return UCS_PTR_STATUS(ptr);
    }
    *request_out = ptr;
    return UCS_INPROGRESS;
}

/* Close an endpoint: force (no peer confirmation; outstanding requests complete with
 * UCS_ERR_CANCELED) or flush. */
int tandem_ep_close(ucp_ep_h ep, int force, void **request_out) {
    ucp_request_param_t param;
    memset(&param, 0, sizeof(param));
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    return tandem_status_ptr(ucp_ep_close_nbx(ep, &param), request_out);
}

/* Flush: completes once every operation issued on the endpoint so far has completed remotely. */
int tandem_ep_flush(ucp_ep_h ep, void **request_out) {
    ucp_request_param_t param;
    memset(&param, 0, sizeof(param));
    return tandem_status_ptr(ucp_ep_flush_nbx(ep, &param), request_out);
}

int tandem_request_check_status(void *request) { return ucp_request_check_status(request); }

void tandem_request_free(void *request) { ucp_request_free(request); }

/* Register an existing buffer (no allocation by UCX). */
int tandem_mem_map(ucp_context_h context, void *address, size_t length, ucp_mem_h *memh_out) {
    ucp_mem_map_params_t params;
    memset(&params, 0, sizeof(params));
    params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    params.address = address;
    params.length = length;
    return ucp_mem_map(context, &params, memh_out);
}

/* Let UCX allocate and register `length` bytes (UCP_MEM_MAP_ALLOCATE). Over shared memory UCX
 * then places them in a sysv/posix segment that a peer maps when it unpacks the rkey, so the
 * peer's gets become plain copies from that mapping instead of the active-message emulation that
 * user memory gets in UCX 1.13 (its cma transport is not used for ucp_get_nbx). */
int tandem_mem_alloc(ucp_context_h context, size_t length, ucp_mem_h *memh_out,
                     void **address_out) {
    ucp_mem_map_params_t params;
    memset(&params, 0, sizeof(params));
    params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                        UCP_MEM_MAP_PARAM_FIELD_FLAGS;
    params.address = NULL;
    params.length = length;
    params.flags = UCP_MEM_MAP_ALLOCATE;
    ucs_status_t status = ucp_mem_map(context, &params, memh_out);
    if (status != UCS_OK) {
        return status;
    }
    ucp_mem_attr_t attr;
    memset(&attr, 0, sizeof(attr));
    attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
    status = ucp_mem_query(*memh_out, &attr);
    if (status != UCS_OK || attr.length < length) {
        ucp_mem_unmap(context, *memh_out);
        return status != UCS_OK ? status : UCS_ERR_NO_MEMORY;
    }
    *address_out = attr.address;
    return UCS_OK;
}

int tandem_mem_unmap(ucp_context_h context, ucp_mem_h memh) { return ucp_mem_unmap(context, memh); }

int tandem_rkey_pack(ucp_context_h context, ucp_mem_h memh, void **buffer_out,
                     size_t *length_out) {
    return ucp_rkey_pack(context, memh, buffer_out, length_out);
}

void tandem_rkey_buffer_release(void *buffer) { ucp_rkey_buffer_release(buffer); }

int tandem_rkey_unpack(ucp_ep_h ep, const void *buffer, ucp_rkey_h *rkey_out) {
    return ucp_ep_rkey_unpack(ep, buffer, rkey_out);
}

void tandem_rkey_destroy(ucp_rkey_h rkey) { ucp_rkey_destroy(rkey); }

/* RMA get of `length` contiguous bytes at remote_address into buffer. No callback: the Rust side
 * polls the request with ucp_request_check_status after each progress round. */
int tandem_get(ucp_ep_h ep, void *buffer, size_t length, uint64_t remote_address, ucp_rkey_h rkey,
               void **request_out) {
    ucp_request_param_t param;
    memset(&param, 0, sizeof(param));
    return tandem_status_ptr(ucp_get_nbx(ep, buffer, length, remote_address, rkey, &param),
                             request_out);
}
