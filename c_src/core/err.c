/*
 * err.c: the message and the name of every error code moat returns.
 *
 * moat's own codes come from MOAT_ERRNO_MAP (include/moat.h), so adding a
 * code there is all it takes.  Every other code is libuv's or -errno.
 * libuv answers for the codes in its UV_ERRNO_MAP; we never hand it any
 * other code, because for a code it does not know uv_strerror and
 * uv_err_name return a fresh strdup'd string that no caller frees.  The
 * remaining -errno values get glibc's static descriptions, and anything
 * else a fixed string, so the result is never NULL and never allocated.
 */
#include <string.h>

#include <uv.h>

#include "moat_core.h"

/* The largest errno value the kernel returns (MAX_ERRNO in Linux). */
#define ERRNO_MAX 4095

static int is_uv_code(int err) {
    switch (err) {
#define XX(name, msg) case UV_##name:
        UV_ERRNO_MAP(XX)
#undef XX
        return 1;
    default:
        return 0;
    }
}

const char *moat_strerror(int err) {
    const char *msg;

    switch (err) {
    case 0:
        return "success";
#define XX(name, code, text)                                                \
    case MOAT_E##name:                                                      \
        return text;
        MOAT_ERRNO_MAP(XX)
#undef XX
    default:
        break;
    }
    if (is_uv_code(err))
        return uv_strerror(err);
    if (err < 0 && err >= -ERRNO_MAX) {
        msg = strerrordesc_np(-err);
        if (msg != NULL)
            return msg;
    }
    return "unknown error";
}

const char *moat_err_name(int err) {
    const char *name;

    switch (err) {
    case 0:
        return "OK";
#define XX(name, code, text)                                                \
    case MOAT_E##name:                                                      \
        return "MOAT_E" #name;
        MOAT_ERRNO_MAP(XX)
#undef XX
    default:
        break;
    }
    if (is_uv_code(err))
        return uv_err_name(err);
    if (err < 0 && err >= -ERRNO_MAX) {
        name = strerrorname_np(-err);
        if (name != NULL)
            return name;
    }
    return "UNKNOWN";
}
