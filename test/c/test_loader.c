/*
 * test_loader.c: loading task libraries, good and bad.
 *
 * Needs MOAT_DEMO_SO (the demo library) and MOAT_FIXTURES_DIR (the
 * compiled fixtures of test/c/fixtures, each foo.c as foo.so).  The tests
 * point $TMPDIR at a directory of their own, so they can tell that every
 * copy the loader makes is gone once a load returns, whatever its outcome.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "fake_ctx.h"
#include "moat_core.h"

static char scratch[256];   /* the test's own directory */
static char copies[300];    /* $TMPDIR while the tests run */
static char path_buf[1024]; /* what fixture() and scratch_path() return */

static const char *env(const char *name) {
    const char *v = getenv(name);

    if (v == NULL || v[0] == '\0')
        fail_msg("%s is not set", name);
    return v;
}

static const char *fixture(const char *name) {
    snprintf(path_buf, sizeof(path_buf), "%s/%s.so", env("MOAT_FIXTURES_DIR"),
             name);
    return path_buf;
}

static const char *scratch_path(const char *name) {
    snprintf(path_buf, sizeof(path_buf), "%s/%s", scratch, name);
    return path_buf;
}

static int count_entries(const char *dir) {
    struct dirent *e;
    DIR *d = opendir(dir);
    int n = 0;

    assert_non_null(d);
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            n++;
    closedir(d);
    return n;
}

static void copy_file(const char *from, const char *to) {
    char buf[8192];
    ssize_t n;
    int in = open(from, O_RDONLY), out;

    assert_true(in >= 0);
    /* in place, as a rebuild overwrites its output */
    out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0755);
    assert_true(out >= 0);
    while ((n = read(in, buf, sizeof(buf))) > 0)
        assert_int_equal(write(out, buf, (size_t)n), n);
    assert_int_equal(n, 0);
    close(in);
    close(out);
}

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
}

static int setup(void **state) {
    const char *tmp = getenv("TMPDIR");

    (void)state;
    snprintf(scratch, sizeof(scratch), "%s/moat-test-loader-XXXXXX",
             tmp && tmp[0] ? tmp : "/tmp");
    if (mkdtemp(scratch) == NULL)
        return -1;
    snprintf(copies, sizeof(copies), "%s/copies", scratch);
    if (mkdir(copies, 0700) < 0)
        return -1;
    return setenv("TMPDIR", copies, 1);
}

static int teardown(void **state) {
    (void)state;
    if (rmdir(copies) < 0 || rmdir(scratch) < 0) {
        fprintf(stderr, "left behind in %s\n", scratch);
        return -1;
    }
    return 0;
}

/* Each test ends with no copy left in $TMPDIR. */
static int no_copies_left(void **state) {
    (void)state;
    return count_entries(copies) == 0 ? 0 : -1;
}

/* Opens `path` and expects failure with `code` and a message naming it. */
static void expect_error(const char *path, int code, const char *words) {
    moat_lib_t *lib = (moat_lib_t *)1;
    char *msg = NULL;
    char name[1024];
    int rc;

    snprintf(name, sizeof(name), "%s", path);
    rc = moat_lib_open(name, &lib, &msg);
    if (rc != code)
        fail_msg("%s: expected %s, got %s (%s)", name, moat_err_name(code),
                 moat_err_name(rc), msg ? msg : "no message");
    assert_null(lib);
    assert_non_null(msg);
    if (strstr(msg, name) == NULL || strncmp(msg, "moat: ", 6) != 0)
        fail_msg("message does not name %s: %s", name, msg);
    if (words != NULL && strstr(msg, words) == NULL)
        fail_msg("message does not say \"%s\": %s", words, msg);
    free(msg);
    assert_int_equal(count_entries(copies), 0);
}

static moat_lib_t *open_ok(const char *path) {
    moat_lib_t *lib = NULL;
    char *msg = NULL;
    int rc = moat_lib_open(path, &lib, &msg);

    if (rc != 0)
        fail_msg("%s: %s", path, msg ? msg : moat_strerror(rc));
    assert_non_null(lib);
    assert_null(msg);
    return lib;
}

/* Runs a task that answers with moat_error and returns its message. */
static void expect_message(const moat_lib_t *lib, const char *task,
                           const char *message) {
    const moat_task_def_t *def = moat_lib_task(lib, task, strlen(task));
    static const char args[] = {(char)131, 106};
    fake_ctx_t f;
    ei_x_buff out;

    assert_non_null(def);
    fake_ctx_init(&f);
    assert_int_equal(fake_ctx_run(&f, def->run, args, sizeof(args), &out),
                     MOAT_ERROR);
    assert_string_equal(f.error, message);
    ei_x_free(&out);
}

/* ------------------------------------------------------------ good */

static void test_loader_demo_has_every_task(void **state) {
    static const char *names[] = {"echo", "sleep", "spin", "fail",
                                  "exit", "segfault", "abort", "alloc",
                                  "fib", "sum"};
    const moat_server_def_t *counter;
    const moat_task_def_t *t;
    moat_lib_t *lib = open_ok(env("MOAT_DEMO_SO"));
    size_t i;

    (void)state;
    assert_string_equal(moat_lib_name(lib), "moat_demo");
    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        t = moat_lib_task(lib, names[i], strlen(names[i]));
        assert_non_null(t);
        assert_string_equal(t->name, names[i]);
        assert_non_null(t->run);
    }
    counter = moat_lib_server(lib, "counter", 7);
    assert_non_null(counter);
    assert_string_equal(counter->name, "counter");
    assert_non_null(counter->init);
    assert_non_null(counter->handle_call);
    assert_non_null(counter->handle_cast);
    assert_non_null(counter->terminate);
    moat_lib_close(lib);
}

static void test_loader_lookup_uses_exact_bytes(void **state) {
    moat_lib_t *lib = open_ok(env("MOAT_DEMO_SO"));
    const moat_task_def_t *echo = moat_lib_task(lib, "echo", 4);

    (void)state;
    assert_non_null(echo);
    assert_ptr_equal(moat_lib_task(lib, "echoes", 4), echo); /* a prefix */
    assert_null(moat_lib_task(lib, "echoes", 6));
    assert_null(moat_lib_task(lib, "ech", 3));
    assert_null(moat_lib_task(lib, "nope", 4));
    assert_null(moat_lib_task(lib, "echo", 0));
    assert_null(moat_lib_task(lib, NULL, 4));
    assert_null(moat_lib_task(lib, "counter", 7)); /* a server, not a task */
    assert_null(moat_lib_server(lib, "echo", 4));
    assert_null(moat_lib_server(lib, "count", 5));
    moat_lib_close(lib);
}

static void test_loader_runs_the_loaded_code(void **state) {
    moat_lib_t *lib = open_ok(env("MOAT_DEMO_SO"));
    const moat_task_def_t *echo = moat_lib_task(lib, "echo", 4);
    fake_ctx_t f;
    ei_x_buff args, out;
    long v;
    int index = 1;

    (void)state;
    ei_x_new_with_version(&args);
    ei_x_encode_list_header(&args, 1);
    ei_x_encode_long(&args, 123456);
    ei_x_encode_empty_list(&args);
    fake_ctx_init(&f);
    assert_int_equal(fake_ctx_run(&f, echo->run, args.buff, args.index, &out),
                     MOAT_OK);
    assert_int_equal(ei_decode_long(out.buff, &index, &v), 0);
    assert_int_equal(v, 123456);
    ei_x_free(&args);
    ei_x_free(&out);
    moat_lib_close(lib);
}

/* A thread may still be inside an abandoned task when its library closes:
 * the code must stay mapped. */
static void test_loader_close_keeps_the_code_mapped(void **state) {
    moat_lib_t *lib = open_ok(fixture("reload_v1"));
    moat_task_fn fn = moat_lib_task(lib, "version", 7)->run;
    static const char args[] = {(char)131, 106};
    fake_ctx_t f;
    ei_x_buff out;

    (void)state;
    moat_lib_close(lib);
    fake_ctx_init(&f);
    assert_int_equal(fake_ctx_run(&f, fn, args, sizeof(args), &out),
                     MOAT_ERROR);
    assert_string_equal(f.error, "version 1");
    ei_x_free(&out);
}

static void test_loader_accepts_a_255_byte_name(void **state) {
    moat_lib_t *lib = open_ok(fixture("max_name"));
    char name[256];

    (void)state;
    memset(name, 'a', 255);
    name[255] = '\0';
    assert_non_null(moat_lib_task(lib, name, 255));
    assert_null(moat_lib_task(lib, name, 254));
    moat_lib_close(lib);
}

static void test_loader_reloads_after_rebuild(void **state) {
    char lib_path[1024];
    moat_lib_t *first, *second, *third;

    (void)state;
    snprintf(lib_path, sizeof(lib_path), "%s", scratch_path("reload.so"));
    copy_file(fixture("reload_v1"), lib_path);
    first = open_ok(lib_path);
    expect_message(first, "version", "version 1");

    copy_file(fixture("reload_v2"), lib_path);
    second = open_ok(lib_path);
    expect_message(second, "version", "version 2");
    expect_message(first, "version", "version 1"); /* the old build lives on */

    copy_file(fixture("reload_v1"), lib_path);
    third = open_ok(lib_path);
    expect_message(third, "version", "version 1");

    moat_lib_close(first);
    moat_lib_close(second);
    moat_lib_close(third);
    assert_int_equal(unlink(lib_path), 0);
}

/* A rejected library is unmapped again; an accepted one stays mapped. */
static void test_loader_pins_only_accepted_libraries(void **state) {
    char needle[64], line[4096];
    moat_lib_t *lib;
    int bad = 0, good = 0;
    FILE *maps;

    (void)state;
    expect_error(fixture("no_symbol"), MOAT_EBADLIB, NULL);
    lib = open_ok(fixture("max_name"));
    moat_lib_close(lib);
    snprintf(needle, sizeof(needle), "/moat-%ld-", (long)getpid());
    maps = fopen("/proc/self/maps", "r");
    assert_non_null(maps);
    while (fgets(line, sizeof(line), maps) != NULL) {
        if (strstr(line, needle) == NULL)
            continue;
        bad += strstr(line, "-no_symbol.so") != NULL;
        good += strstr(line, "-max_name.so") != NULL;
    }
    fclose(maps);
    assert_int_equal(bad, 0);
    assert_true(good > 0);
}

#define OPEN_THREADS 4

static void open_worker(void *arg) {
    moat_lib_t **lib = arg;
    char *msg = NULL;

    if (moat_lib_open(getenv("MOAT_DEMO_SO"), lib, &msg) != 0)
        *lib = NULL;
    free(msg);
}

/* Loads may run on any thread at once; each gets its own copy. */
static void test_loader_opens_from_many_threads(void **state) {
    uv_thread_t threads[OPEN_THREADS];
    moat_lib_t *libs[OPEN_THREADS];
    int i;

    (void)state;
    env("MOAT_DEMO_SO");
    for (i = 0; i < OPEN_THREADS; i++)
        assert_int_equal(uv_thread_create(&threads[i], open_worker, &libs[i]),
                         0);
    for (i = 0; i < OPEN_THREADS; i++)
        assert_int_equal(uv_thread_join(&threads[i]), 0);
    for (i = 0; i < OPEN_THREADS; i++) {
        assert_non_null(libs[i]);
        assert_non_null(moat_lib_task(libs[i], "sum", 3));
        if (i > 0)
            assert_ptr_not_equal(moat_lib_task(libs[i], "sum", 3),
                                 moat_lib_task(libs[0], "sum", 3));
    }
    for (i = 0; i < OPEN_THREADS; i++)
        moat_lib_close(libs[i]);
}

/* ------------------------------------------------------------- bad */

static void test_loader_missing_file(void **state) {
    (void)state;
    expect_error(scratch_path("missing.so"), -ENOENT, "cannot open");
}

static void test_loader_directory(void **state) {
    (void)state;
    expect_error(scratch, -EISDIR, "directory");
}

static void test_loader_fifo(void **state) {
    char path[1024];

    (void)state;
    snprintf(path, sizeof(path), "%s", scratch_path("fifo.so"));
    assert_int_equal(mkfifo(path, 0600), 0);
    expect_error(path, MOAT_EBADLIB, "not a regular file");
    unlink(path);
}

static void test_loader_empty_file(void **state) {
    char path[1024];

    (void)state;
    snprintf(path, sizeof(path), "%s", scratch_path("empty.so"));
    write_file(path, "");
    expect_error(path, MOAT_EBADLIB, "cannot load");
    unlink(path);
}

static void test_loader_text_file(void **state) {
    char path[1024];

    (void)state;
    snprintf(path, sizeof(path), "%s", scratch_path("text.so"));
    write_file(path, "this is not an ELF object\n");
    expect_error(path, MOAT_EBADLIB, "cannot load");
    unlink(path);
}

static void test_loader_elf_without_the_symbol(void **state) {
    (void)state;
    expect_error(fixture("no_symbol"), MOAT_EBADLIB,
                 "not a task library (no moat_library symbol)");
}

static void test_loader_entry_returning_null(void **state) {
    (void)state;
    expect_error(fixture("null_library"), MOAT_EBADLIB, "returned NULL");
}

static void test_loader_wrong_abi_version(void **state) {
    char words[128];

    (void)state;
    snprintf(words, sizeof(words),
             "built for moat ABI version %d, this moat has ABI version %d",
             MOAT_ABI_VERSION + 1, MOAT_ABI_VERSION);
    expect_error(fixture("wrong_abi"), MOAT_EABI, words);
}

static void test_loader_short_table(void **state) {
    (void)state;
    expect_error(fixture("short_table"), MOAT_EBADLIB, "bytes");
}

static void test_loader_null_task_table(void **state) {
    (void)state;
    expect_error(fixture("null_tasks"), MOAT_EBADLIB, "no task table");
}

static void test_loader_duplicate_task_names(void **state) {
    (void)state;
    expect_error(fixture("dup_names"), MOAT_EBADLIB, "\"twice\"");
}

static void test_loader_null_function(void **state) {
    (void)state;
    expect_error(fixture("null_fn"), MOAT_EBADLIB, "\"broken\"");
}

static void test_loader_name_of_256_bytes(void **state) {
    (void)state;
    expect_error(fixture("long_name"), MOAT_EBADLIB, "longer than 255");
}

static void test_loader_empty_name(void **state) {
    (void)state;
    expect_error(fixture("empty_name"), MOAT_EBADLIB, "empty name");
}

static void test_loader_server_without_call(void **state) {
    (void)state;
    expect_error(fixture("server_no_call"), MOAT_EBADLIB, "handle_call");
}

static void test_loader_unusable_tmpdir(void **state) {
    char missing[400];

    (void)state;
    snprintf(missing, sizeof(missing), "%s/nowhere", scratch);
    setenv("TMPDIR", missing, 1);
    expect_error(env("MOAT_DEMO_SO"), -ENOENT, "cannot create");
    setenv("TMPDIR", copies, 1);
}

static void test_loader_message_is_optional(void **state) {
    moat_lib_t *lib = NULL;

    (void)state;
    assert_int_equal(moat_lib_open(fixture("no_symbol"), &lib, NULL),
                     MOAT_EBADLIB);
    assert_null(lib);
    assert_int_equal(moat_lib_open(fixture("missing"), &lib, NULL), -ENOENT);
    assert_int_equal(moat_lib_open(NULL, &lib, NULL), MOAT_EINVAL);
    moat_lib_close(NULL);
}

#define TEST(f) cmocka_unit_test_teardown(f, no_copies_left)

int main(void) {
    const struct CMUnitTest tests[] = {
        TEST(test_loader_demo_has_every_task),
        TEST(test_loader_lookup_uses_exact_bytes),
        TEST(test_loader_runs_the_loaded_code),
        TEST(test_loader_close_keeps_the_code_mapped),
        TEST(test_loader_accepts_a_255_byte_name),
        TEST(test_loader_reloads_after_rebuild),
        TEST(test_loader_pins_only_accepted_libraries),
        TEST(test_loader_opens_from_many_threads),
        TEST(test_loader_missing_file),
        TEST(test_loader_directory),
        TEST(test_loader_fifo),
        TEST(test_loader_empty_file),
        TEST(test_loader_text_file),
        TEST(test_loader_elf_without_the_symbol),
        TEST(test_loader_entry_returning_null),
        TEST(test_loader_wrong_abi_version),
        TEST(test_loader_short_table),
        TEST(test_loader_null_task_table),
        TEST(test_loader_duplicate_task_names),
        TEST(test_loader_null_function),
        TEST(test_loader_name_of_256_bytes),
        TEST(test_loader_empty_name),
        TEST(test_loader_server_without_call),
        TEST(test_loader_unusable_tmpdir),
        TEST(test_loader_message_is_optional),
    };

    return cmocka_run_group_tests(tests, setup, teardown);
}
