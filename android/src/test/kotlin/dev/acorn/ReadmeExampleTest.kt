package dev.acorn

import example.complete
import example.embed
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

class ReadmeExampleTest {
    @Test
    fun readmeExampleRuns() {
        val ids = Fixtures.longs("minilm.ids").copyOf(Fixtures.int("minilm.seq"))
        val e = embed(Fixtures.path("minilm.model"), ids)
        assertEquals(384, e.size)
        assertTrue(e.all { it.isFinite() })
        val text = complete(Fixtures.path("smollm2.model"), Fixtures.string("smollm2.prompt"))
        assertTrue(text.contains("Paris"), text)
    }
}
