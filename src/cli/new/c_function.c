/* {{name}}: an edgefn function in C (a core WebAssembly module, ABI v1,
 * docs/ABI.md). Each MQTT message on the function's triggers arrives in
 * edgefn_on_message; returning 0 keeps what it emitted, anything else fails
 * the invocation (retried, then a dead letter with set_error's text). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EDGEFN_IMPORT(name) __attribute__((import_module("edgefn"), import_name(name)))
#define EXPORT(name) __attribute__((export_name(name)))

EDGEFN_IMPORT("emit") int32_t emit(const char *topic, int32_t topic_len,
                                   const uint8_t *payload, int32_t payload_len);
EDGEFN_IMPORT("set_error") void set_error(const char *message, int32_t len);

EXPORT("edgefn_abi_version") int32_t edgefn_abi_version(void) { return 1; }

EXPORT("edgefn_alloc") void *edgefn_alloc(int32_t size) { return malloc(size > 0 ? size : 1); }

EXPORT("edgefn_on_message")
int32_t edgefn_on_message(const char *topic, int32_t topic_len,
                          const uint8_t *payload, int32_t payload_len) {
    char out[512];
    int n = snprintf(out, sizeof out, "processed/%.*s", (int)topic_len, topic);
    int32_t status = -1;
    if (n > 0 && n < (int)sizeof out) {
        status = emit(out, n, payload, payload_len);
    }
    free((void *)topic); /* one allocation holds the topic and the payload */
    if (status != 0) {
        const char *why = "emit was refused";
        set_error(why, (int32_t)strlen(why));
        return 1;
    }
    return 0;
}
