/* fan_alarm.c: an edgefn function (ABI v1) written in C.
 *
 * Input: a temperature as text, e.g. "31.5", on sensors/<device>/temperature.
 * Output: the record {"device":"<device>","temp_c":31.5} on
 * telemetry/<device>/temperature and, when the temperature is above the env
 * variable THRESHOLD (default 30), the command "on" published to the local
 * topic devices/<device>/fan (the function's configuration must allow it:
 * publish_allow = ["devices/+/fan"]). A payload that is not a number fails
 * the invocation with an error message.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Host imports: module "edgefn". Pointers are offsets into our memory. */
#define EDGEFN_IMPORT(name) __attribute__((import_module("edgefn"), import_name(name)))
EDGEFN_IMPORT("emit") int32_t edgefn_emit(const char *topic, int32_t topic_len,
                                          const char *payload, int32_t payload_len);
EDGEFN_IMPORT("publish") int32_t edgefn_publish(const char *topic, int32_t topic_len,
                                                const char *payload, int32_t payload_len);
EDGEFN_IMPORT("log") void edgefn_log(int32_t level, const char *msg, int32_t msg_len);
EDGEFN_IMPORT("set_error") void edgefn_set_error(const char *msg, int32_t msg_len);
/* Durable per-function state (not used by this function; declaring an
 * import it does not call adds nothing to the module). */
EDGEFN_IMPORT("state_get") int32_t edgefn_state_get(const void *key, int32_t key_len,
                                                    void *buf, int32_t buf_len);
EDGEFN_IMPORT("state_set") int32_t edgefn_state_set(const void *key, int32_t key_len,
                                                    const void *value, int32_t value_len);
EDGEFN_IMPORT("state_delete") int32_t edgefn_state_delete(const void *key, int32_t key_len);

#define EXPORT(name) __attribute__((export_name(name)))

static double threshold = 30.0;

static int32_t fail(const char *msg) {
    edgefn_set_error(msg, (int32_t)strlen(msg));
    return 1;
}

/* Required: the ABI version. */
EXPORT("edgefn_abi_version") int32_t abi_version(void) { return 1; }

/* Required: the host asks for the block it writes the input into. */
EXPORT("edgefn_alloc") void *alloc(int32_t size) {
    return size < 0 ? NULL : malloc(size ? (size_t)size : 1);
}

/* Optional: once per instance, before the first message. */
EXPORT("edgefn_init") int32_t init(void) {
    const char *t = getenv("THRESHOLD");
    if (t) {
        char *end;
        threshold = strtod(t, &end);
        if (end == t) return fail("THRESHOLD is not a number");
    }
    return 0;
}

static int32_t handle(const char *topic, int32_t topic_len, const char *payload, int32_t payload_len) {
    /* The device is the second topic level: sensors/<device>/... */
    const char *start = memchr(topic, '/', (size_t)topic_len);
    if (!start) return fail("no device in the topic");
    start++;
    const char *end = memchr(start, '/', (size_t)(topic + topic_len - start));
    int dev_len = (int)((end ? end : topic + topic_len) - start);
    if (dev_len == 0 || dev_len > 64) return fail("bad device name in the topic");

    /* The payload is not NUL-terminated: copy it to parse it. */
    char text[32], *text_end;
    if (payload_len <= 0 || payload_len >= (int32_t)sizeof text) return fail("payload is not a number");
    memcpy(text, payload, (size_t)payload_len);
    text[payload_len] = '\0';
    double temp_c = strtod(text, &text_end);
    if (text_end == text || *text_end != '\0') return fail("payload is not a number");

    char out_topic[128], out[160];
    int n = snprintf(out, sizeof out, "{\"device\":\"%.*s\",\"temp_c\":%g}", dev_len, start, temp_c);
    snprintf(out_topic, sizeof out_topic, "telemetry/%.*s/temperature", dev_len, start);
    if (edgefn_emit(out_topic, (int32_t)strlen(out_topic), out, n) != 0) return fail("emit refused");

    if (temp_c > threshold) {
        snprintf(out_topic, sizeof out_topic, "devices/%.*s/fan", dev_len, start);
        if (edgefn_publish(out_topic, (int32_t)strlen(out_topic), "on", 2) != 0) return fail("publish refused");
        const char *msg = "too hot: fan on";
        edgefn_log(3, msg, (int32_t)strlen(msg));
    }
    return 0;
}

/* Required: the handler. 0 = success. The input block (topic, then payload)
 * came from edgefn_alloc and is ours to free. */
EXPORT("edgefn_on_message") int32_t on_message(const char *topic, int32_t topic_len,
                                               const char *payload, int32_t payload_len) {
    int32_t rc = handle(topic, topic_len, payload, payload_len);
    free((void *)topic);
    return rc;
}
