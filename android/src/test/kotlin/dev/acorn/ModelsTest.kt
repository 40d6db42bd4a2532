package dev.acorn

import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.util.concurrent.Callable
import java.util.concurrent.Executors
import org.junit.jupiter.api.Assertions.assertArrayEquals
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

/** The three models through the Kotlin API, against the Rust API's results bit for bit. */
class ModelsTest {
    private val batch = Fixtures.int("minilm.batch").toLong()
    private val seq = Fixtures.int("minilm.seq").toLong()
    private val ids = Fixtures.longs("minilm.ids")
    private val mask = Fixtures.longs("minilm.mask")
    private val embedding = Fixtures.string("minilm.output")

    private fun minilmInputs() = mapOf(
        "input_ids" to Tensor.of(ids, batch, seq),
        "attention_mask" to Tensor.of(mask, batch, seq)
    )

    @Test
    fun minilmEmbeddingsEqualRust() {
        Model.open(Fixtures.path("minilm.model")).use { model ->
            assertEquals(listOf("input_ids", "attention_mask"), model.inputs.map { it.name }.filter { it != "token_type_ids" })
            assertEquals(DType.I64, model.inputs[0].dtype)
            model.newSession().use { session ->
                val out = session.run(minilmInputs())
                val e = out.getValue(embedding)
                assertEquals(DType.F32, e.dtype)
                assertArrayEquals(longArrayOf(batch, 384), e.shape)
                assertArrayEquals(Fixtures.floats("minilm.expected").bits(), e.floats().bits(), "embeddings differ from the Rust API's")
            }
        }
    }

    @Test
    fun directBuffersAreReadInPlaceAndGiveTheSameEmbeddings() {
        fun direct(v: LongArray): ByteBuffer {
            val b = ByteBuffer.allocateDirect(v.size * 8).order(ByteOrder.nativeOrder())
            b.asLongBuffer().put(v)
            return b
        }
        Model.open(Fixtures.path("minilm.model")).use { model ->
            val out = model.run(mapOf(
                "input_ids" to Tensor.of(direct(ids), DType.I64, batch, seq),
                "attention_mask" to Tensor.of(direct(mask), DType.I64, batch, seq)
            ))
            assertArrayEquals(Fixtures.floats("minilm.expected").bits(), out.getValue(embedding).floats().bits())
        }
    }

    @Test
    fun fromBytesEqualsOpen() {
        val bytes = java.io.File(Fixtures.path("minilm.model")).readBytes()
        Model.fromBytes(bytes).use { model ->
            val e = model.run(minilmInputs()).getValue(embedding)
            assertArrayEquals(Fixtures.floats("minilm.expected").bits(), e.floats().bits())
        }
    }

    @Test
    fun aModelInsideALargerFileOpensByDescriptor() {
        // An APK's uncompressed asset: the model at an offset of a larger file, mapped through a
        // descriptor (obtained here by reflection, as the JVM has no public getter; Android's
        // ParcelFileDescriptor.getFd() gives it directly).
        val bytes = java.io.File(Fixtures.path("minilm.model")).readBytes()
        val packed = java.io.File.createTempFile("packed", ".apk")
        try {
            packed.writeBytes(ByteArray(4096) { 0x5a } + bytes + ByteArray(100))
            java.io.FileInputStream(packed).use { stream ->
                val field = java.io.FileDescriptor::class.java.getDeclaredField("fd")
                field.isAccessible = true
                val fd = field.getInt(stream.fd)
                Model.openFd(fd, 4096, bytes.size.toLong())
            }.use { model ->
                // The stream is closed: the model holds its own duplicate.
                val e = model.run(minilmInputs()).getValue(embedding)
                assertArrayEquals(Fixtures.floats("minilm.expected").bits(), e.floats().bits())
            }
        } finally {
            packed.delete()
        }
    }

    @Test
    fun vadStreamEqualsRust() {
        val audio = Fixtures.floats("vad.audio")
        val want = Fixtures.floats("vad.expected")
        Model.open(Fixtures.path("vad.model")).use { model ->
            model.newSession().use { session ->
                val sr = Tensor.of(longArrayOf(16000))
                var state = Tensor.of(FloatArray(256), 2, 1, 128)
                val frame = FloatArray(576)
                val got = FloatArray(audio.size / 512)
                for (c in got.indices) {
                    // 64 samples of context, then the chunk.
                    System.arraycopy(frame, 512, frame, 0, 64)
                    System.arraycopy(audio, c * 512, frame, 64, 512)
                    val out = session.run(mapOf("input" to Tensor.of(frame.copyOf(), 1, 576), "state" to state, "sr" to sr))
                    got[c] = out.getValue("output").floats()[0]
                    state = out.getValue("stateN")
                }
                assertArrayEquals(want.bits(), got.bits(), "VAD probabilities differ from the Rust API's")
                assertTrue(got.any { it > 0.5f }, "speech found in the clip")
            }
        }
    }

    @Test
    fun greedyGenerationEqualsRustAndStreams() {
        val want = Fixtures.ints("smollm2.expected")
        Model.open(Fixtures.path("smollm2.model")).use { model ->
            model.newGenerator(threads = 1, maxContext = 256).use { gen ->
                val streamed = ArrayList<Int>()
                val pieces = StringBuilder()
                val g = gen.generate(Fixtures.string("smollm2.prompt"), GenerateOptions(maxTokens = want.size)) { piece, token ->
                    streamed.add(token)
                    pieces.append(piece)
                    true
                }
                assertArrayEquals(want, g.tokens, "tokens differ from the Rust API's")
                assertArrayEquals(want, streamed.toIntArray())
                assertEquals(pieces.toString(), g.text)
                assertTrue(g.text.contains("Paris"), g.text)
                assertTrue(g.promptTokens > 0)
                assertEquals(StopReason.MAX_TOKENS, g.stopReason)

                // A listener that says stop after three tokens.
                gen.reset()
                var n = 0
                val three = gen.generate(Fixtures.string("smollm2.prompt"), GenerateOptions(maxTokens = want.size)) { _, _ ->
                    ++n < 3
                }
                assertArrayEquals(want.copyOf(3), three.tokens)
                assertEquals(StopReason.CANCELLED, three.stopReason)

                // The same prompt as token ids gives the same tokens after a reset.
                gen.reset()
                val byIds = gen.generate(Fixtures.ints("smollm2.prompt_ids"), GenerateOptions(maxTokens = want.size))
                assertArrayEquals(want, byIds.tokens)

                // Self-speculative decoding with the exit after layer 16: the same greedy tokens.
                gen.reset()
                val spec = gen.generate(
                    Fixtures.string("smollm2.prompt"),
                    GenerateOptions(maxTokens = want.size, decoding = Decoding.Speculative(exitLayer = 16, draftTokens = 3))
                )
                assertArrayEquals(want, spec.tokens, "speculative tokens differ from plain decoding")
                assertEquals(30.0, spec.meanLayersPerToken)
                gen.reset()
                val early = gen.generate(
                    Fixtures.string("smollm2.prompt"),
                    GenerateOptions(maxTokens = want.size, decoding = Decoding.EarlyExit(threshold = 0.5f))
                )
                assertTrue(early.meanLayersPerToken in 8.0..30.0, "${early.meanLayersPerToken}")
            }
        }
    }

    @Test
    fun cancelFromAnotherThreadStopsAGeneration() {
        Model.open(Fixtures.path("smollm2.model")).use { model ->
            model.newGenerator(maxContext = 256).use { gen ->
                val pool = Executors.newSingleThreadExecutor()
                try {
                    val g = gen.generate("Once upon a time", GenerateOptions(maxTokens = 200)) { _, _ ->
                        // Cancel from another thread after the first token; it stops at the next.
                        pool.submit { gen.cancel() }.get()
                        true
                    }
                    assertEquals(StopReason.CANCELLED, g.stopReason)
                    assertTrue(g.tokens.size < 200)
                } finally {
                    pool.shutdown()
                }
            }
        }
    }

    @Test
    fun sessionsOnFourThreadsShareAModel() {
        val want = Fixtures.floats("minilm.expected").bits()
        Model.open(Fixtures.path("minilm.model")).use { model ->
            val pool = Executors.newFixedThreadPool(4)
            try {
                val jobs = (0 until 4).map {
                    pool.submit(Callable {
                        model.newSession().use { s ->
                            (0 until 5).all { s.run(minilmInputs()).getValue(embedding).floats().bits().contentEquals(want) }
                        }
                    })
                }
                assertTrue(jobs.all { it.get() }, "every thread's embeddings equal the Rust API's")
            } finally {
                pool.shutdown()
            }
        }
    }
}
