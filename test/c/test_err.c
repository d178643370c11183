/*
 * test_err.c: every error code has a message and a name, and neither is
 * ever NULL or allocated (valgrind would report what uv_strerror leaks for
 * codes it does not know).
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>
#include <uv.h>

#include "moat_core.h"

static void test_err_moat_codes_come_from_the_map(void **state) {
    (void)state;
#define XX(name, code, msg)                                                 \
    assert_string_equal(moat_strerror(code), msg);                          \
    assert_string_equal(moat_err_name(code), "MOAT_E" #name);
    MOAT_ERRNO_MAP(XX)
#undef XX
    assert_string_equal(moat_err_name(MOAT_EBADTERM), "MOAT_EBADTERM");
    assert_string_equal(moat_strerror(MOAT_EABI),
                        "task library built for another moat ABI version");
}

static void test_err_system_codes_use_libuv(void **state) {
    (void)state;
    assert_string_equal(moat_strerror(-ENOENT), uv_strerror(UV_ENOENT));
    assert_string_equal(moat_err_name(-ENOENT), "ENOENT");
    assert_string_equal(moat_err_name(UV_EOF), "EOF");
    assert_string_equal(moat_err_name(UV_EAI_NONAME), "EAI_NONAME");
    /* moat's INVAL is not the system's */
    assert_string_equal(moat_err_name(-EINVAL), "EINVAL");
    assert_string_equal(moat_err_name(MOAT_EINVAL), "MOAT_EINVAL");
}

static void test_err_unknown_codes_are_never_null(void **state) {
    /* ECHILD and ENOEXEC are errno values libuv has no name for */
    static const int codes[] = {0, 1, 4242, -ECHILD, -ENOEXEC, -4000,
                                -4096, -19999, -20000, -20099, INT32_MIN,
                                INT32_MAX};
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
        assert_non_null(moat_strerror(codes[i]));
        assert_non_null(moat_err_name(codes[i]));
        assert_true(strlen(moat_strerror(codes[i])) > 0);
    }
    assert_string_equal(moat_err_name(-ECHILD), "ECHILD");
    assert_string_equal(moat_strerror(0), "success");
    assert_string_equal(moat_err_name(-20099), "UNKNOWN");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_err_moat_codes_come_from_the_map),
        cmocka_unit_test(test_err_system_codes_use_libuv),
        cmocka_unit_test(test_err_unknown_codes_are_never_null),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
