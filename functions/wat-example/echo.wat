(module
  (import "edgefn" "emit" (func $emit (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)                 ;; one 64 KiB page
  (data (i32.const 0) "echo")                  ;; the output topic, at offset 0
  (func (export "edgefn_abi_version") (result i32)
    (i32.const 1))
  ;; One input at a time, so the block can always be the same one:
  ;; offsets 1024..65536, or 0 (failure) if the input does not fit.
  (func (export "edgefn_alloc") (param $size i32) (result i32)
    (if (result i32) (i32.le_u (local.get $size) (i32.const 64512))
      (then (i32.const 1024))
      (else (i32.const 0))))
  ;; Emits the payload unchanged on the topic "echo"; fails if refused.
  (func (export "edgefn_on_message")
        (param $topic i32) (param $topic_len i32) (param $payload i32) (param $payload_len i32)
        (result i32)
    (if (call $emit (i32.const 0) (i32.const 4) (local.get $payload) (local.get $payload_len))
      (then (return (i32.const 1))))
    (i32.const 0)))
