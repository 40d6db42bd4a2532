package dev.acorn

import java.io.File
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.io.TempDir

class IntentsTest {
    @Test
    fun classifierAnswersAsTheRustApi() {
        val utterances = Fixtures.string("intent.utterances").split("|")
        val want = Fixtures.string("intent.expected").split(",")
        Model.open(Fixtures.path("intent.model")).use { m ->
            m.newClassifier().use { c ->
                assertEquals(16, c.labels.size)
                val got = ArrayList<String>()
                for (exits in listOf(true, false)) {
                    c.useExits = exits
                    c.classify(*utterances.toTypedArray()).forEach { got.add("${it.label}:${it.exitLayer}:${it.layers}") }
                }
                assertEquals(want, got)
                val e = assertThrows(AcornException::class.java) { c.setThresholds(floatArrayOf(0f, 0.5f)) }
                assertEquals(Status.INPUT, e.status)
            }
            // A plain encoder has no head.
            Model.open(Fixtures.path("intent.other")).use { other ->
                val e = assertThrows(AcornException::class.java) { other.newClassifier() }
                assertTrue(e.message!!.contains("no classification head"), e.message)
            }
        }
    }

    @Test
    fun learnsAnIntentOnTheDevice(@TempDir dir: File) {
        Model.open(Fixtures.path("intent.model")).use { m ->
            m.newEmbedder().use { emb ->
                HeadTrainer().use { t ->
                    listOf("turn on the tv", "switch the television on", "put the telly on", "can you turn the tv on",
                        "power on the tv").forEach { t.add("tv_on", emb.embed(it)) }
                    listOf("is it going to rain today", "what's the forecast").forEach { t.add("weather", emb.embed(it)) }
                    listOf("set a timer for ten minutes", "start a countdown").forEach { t.add("timer", emb.embed(it)) }
                    val x = emb.embed("switch on the tv please")
                    t.fit(HeadKind.PROTOTYPE).use { head ->
                        assertEquals("tv_on", head.predict(x).label)
                        assertNull(head.predict(x, 1.0f).label)
                        assertThrows(AcornException::class.java) { head.predict(x, 1.5f) }
                        val saved = File(dir, "mine.acornhead").path
                        head.save(saved, m)
                        Head.load(saved, m).use { again -> assertEquals(head.predict(x), again.predict(x)) }
                        Model.open(Fixtures.path("intent.other")).use { other ->
                            val e = assertThrows(AcornException::class.java) { Head.load(saved, other) }
                            assertTrue(e.message!!.contains("another encoder"), e.message)
                        }
                    }
                    t.fit(HeadKind.SOFTMAX).use { head -> assertEquals("tv_on", head.predict(x).label) }
                    val e = assertThrows(AcornException::class.java) { t.add("", x) }
                    assertEquals(Status.INPUT, e.status)
                }
            }
        }
    }
}
